"""`use_channels_last` acts on the CPU as well (issue 12, speed): NHWC convolutions are faster
there too (oneDNN), so the key is no longer CUDA-only. The models' weights and the batches are
channels-last, and the logits are those of the default layout up to summation order."""
from __future__ import annotations

import torch

from tests.pipeline_helpers import TINY_FINETUNE


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_models_and_batches_go_channels_last_on_the_cpu_with_the_same_logits():
    from asib_core.config import resolve_experiment
    from asib_core.data import build_data
    from asib_core.models import create_model
    from asib_core.pipeline.models import to_device

    cfg = resolve_experiment("quickstart", ["experiment.dataset.train_per_class=5"]).cfg
    data = build_data(cfg, "cpu")
    x_nhwc = next(iter(data.loader("val", batch_size=32, channels_last=True)))[0]
    x_nchw = next(iter(data.loader("val", batch_size=32)))[0]
    assert _channels_last(x_nhwc) and x_nchw.is_contiguous() and torch.equal(x_nhwc, x_nchw)
    torch.manual_seed(0)
    plain = create_model("resnet20", num_classes=10, pretrained=False, small_input=True).eval()
    nhwc = to_device(create_model("resnet20", num_classes=10, pretrained=False, small_input=True), torch.device("cpu"), True)
    nhwc.load_state_dict(plain.state_dict())
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(_channels_last(w) for w in convs)
    with torch.no_grad():
        torch.testing.assert_close(nhwc.eval()(x_nhwc)["logit"], plain(x_nchw)["logit"], rtol=1e-4, atol=1e-4)


def test_finetune_trains_its_teacher_channels_last_when_the_recipe_says_so(workdir):
    """The teacher a fine-tune writes keeps the layout it was trained in (a channels-last conv
    weight); without the key it is the default layout."""
    from asib_core.pipeline.finetune import run_finetune

    layouts = {}
    for flag in ("true", "false"):
        result = run_finetune("resnet20", "digits", [*TINY_FINETUNE, "finetune_epochs=1", f"use_channels_last={flag}",
                                                     f"finetune_ckpt_path=checkpoints/r20-{flag}.pth"])
        assert result.metrics["val/best_acc"] > 0
        state = torch.load(workdir / "checkpoints" / f"r20-{flag}.pth", weights_only=True)["model"]
        weights = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 4 and v.shape[-1] == 3]
        layouts[flag] = {_channels_last(w) for w in weights}
    assert layouts == {"true": {True}, "false": {False}}
