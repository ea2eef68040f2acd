"""The large teachers, each built exactly once, at 32x32.

One test per model does every check on that single instance (contract for 100 classes, the
10-class head, the distillation adapter, stage coverage, the small-input stem) on one image
and frees it.
Build times on a 2-core CPU: about 1 s (ResNet-152), 2 s (ConvNeXt-S), 5 s (ConvNeXt-L) and
5-9 s (EfficientNet-L2, ~2.7 GB resident).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
from torch import nn

from asib_core.models import create_model, model_info
from asib_core.models.contract import check_feature_dict, partition_parameters

# name -> (adapter dims F -> H -> D with D = 512, final map side at 32x32, extra kwargs)
LARGE_MODELS = {
    "resnet152": ((2048, 1024, 512), 4, {"zero_init_last": False}),
    "convnext_s": ((768, 512, 512), 4, {}),
    "convnext_l": ((1536, 768, 512), 4, {}),
    "efficientnet_l2": ((5504, 2752, 512), 2, {}),
}


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny batches gain nothing from threads, and on a loaded 2-core machine the thread pool's
    spin-waiting made forward passes up to 100x slower; restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def stem_checks(name: str, model) -> None:
    family = model_info(name).family
    if family == "convnext":
        conv, norm = model.stem[0], model.stem[1]
        assert conv.stride == (1, 1) and conv.kernel_size == (4, 4)
        assert "LayerNorm" in type(norm).__name__  # the stem LayerNorm is kept
    elif family == "efficientnet":
        assert model.stem.conv_stem.stride == (1, 1)
    elif family == "resnet":
        assert model.stem.conv1.kernel_size == (3, 3)
        assert isinstance(model.stem.maxpool, nn.Identity)


@pytest.mark.parametrize("name", list(LARGE_MODELS))
def test_large_model_built_once(name):
    dims, side, kwargs = LARGE_MODELS[name]
    start = time.perf_counter()
    model = create_model(name, num_classes=100, distill_out_dim=512, **kwargs).eval()
    built = time.perf_counter() - start
    try:
        adapter = model.distill_adapter
        assert (adapter[0].in_features, adapter[0].out_features, adapter[2].out_features) == dims
        torch.manual_seed(0)
        with torch.no_grad():
            out = model(torch.randn(1, 3, 32, 32))
        check_feature_dict(model, out, batch_size=1, num_classes=100)
        assert out["feat_4d"].shape[-2:] == (side, side)
        assert model.num_features == model_info(name).num_features == dims[0]
        assert model.stage_channels == list(model_info(name).stage_channels)
        with torch.no_grad():
            torch.testing.assert_close(out["logit"], model.classifier(out["feat_2d"]))
            model.reset_classifier(10)
            assert model.classifier(out["feat_2d"]).shape == (1, 10)
        partition_parameters(model)
        stem_checks(name, model)
        if model_info(name).family == "resnet":
            for i in range(1, 5):
                pre = out[f"preact_4d_layer{i}"]
                assert pre.min() < 0
                torch.testing.assert_close(out[f"feat_4d_layer{i}"], torch.relu(pre))
        print(f"{name}: built in {built:.1f}s, forward+checks {time.perf_counter() - start - built:.1f}s")
    finally:
        del model
        gc.collect()
