"""Training rules against hand computations: gradient clipping, early stopping with the best
epoch kept apart from the last, and the teacher fallback to the newest FINISHED fine-tune run."""
from __future__ import annotations

import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from asib_core.engine.amp import Precision
from asib_core.engine.loop import EpochSettings, train_epoch

CPU = torch.device("cpu")


class OneBatch(list):
    device = CPU


def test_gradient_clipping_scales_the_step_to_the_max_norm():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3, bias=False)
    x, y = torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    loss = torch.nn.functional.cross_entropy(layer(x), y)
    (grad,) = torch.autograd.grad(loss, [layer.weight])
    before = layer.weight.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)

    def step(batch):
        logits = layer(batch.x)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, batch.y)}

    assert grad.norm() > 0.1  # the clip is active
    train_epoch(step, OneBatch([(x, y, torch.arange(8))]), optimizer, list(layer.parameters()),
                Precision(CPU, False), EpochSettings(epoch=0, grad_clip_norm=0.1))
    torch.testing.assert_close(layer.weight.detach(), before - grad * (0.1 / grad.norm()), rtol=1e-4, atol=1e-6)


def test_the_clamp_ratio_is_a_fraction_of_the_batches_of_every_rank():
    """Under DDP the clamped-batch count is summed over the ranks; so must be the batch count it
    is divided by (else two ranks clamped on every batch reported 2.0)."""
    layer = torch.nn.Linear(4, 3)
    batches = OneBatch([(torch.randn(4, 4), torch.tensor([0, 1, 2, 0]), torch.arange(4)) for _ in range(3)])

    def step(batch):
        logits = layer(batch.x)
        return logits, {"ce": torch.nn.functional.cross_entropy(logits, batch.y) + 100.0}

    clamp = {"use_loss_clamp": True, "loss_clamp_max": 1.0}
    result = train_epoch(step, batches, torch.optim.SGD(layer.parameters(), lr=0.0), list(layer.parameters()),
                         Precision(CPU, False), EpochSettings(epoch=0, clamp_cfg=clamp),
                         reducer=lambda totals: totals * 2)   # two ranks with the same sums
    assert result.metrics["clamp_ratio"] == 1.0 and result.images == 24


def test_a_run_whose_clamp_binds_on_every_batch_warns_once(tmp_path, caplog):
    """Two epochs with every batch over a tiny cap: one warning (epoch 1) naming the cap; a cap
    that never binds gives none."""
    from test_methods_dkd_fitnet_at_ab_ft import DATA_CFG, build, make_runner

    from asib_core.data import build_data
    from asib_core.models import create_model

    teacher = create_model("resnet8", num_classes=10).eval()
    data = build_data(DATA_CFG, CPU)
    for cap, expected in ((1e-3, 1), (1e6, 0)):
        caplog.clear()
        runner = make_runner(build("dkd", [teacher]), data, tmp_path / str(cap), [2])
        runner.spec.clamp_cfg = {"use_loss_clamp": True, "loss_clamp_max": cap}
        with caplog.at_level("WARNING", logger="asib_core.engine.runner"):
            runner.fit()
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loss clamp:")]
        assert len(said) == expected
        if said:
            assert "every batch of epoch 1" in said[0] and "loss_clamp_max=0.001" in said[0]


def test_early_stopping_and_the_best_epoch_versus_the_last(tmp_path):
    from test_methods_dkd_fitnet_at_ab_ft import DATA_CFG, build, make_runner

    from asib_core.data import build_data
    from asib_core.models import create_model

    teacher = create_model("resnet20", num_classes=10).eval()
    dist = build("dkd", [teacher])
    runner = make_runner(dist, build_data(DATA_CFG, CPU), tmp_path, [10])
    runner.spec.patience, runner.spec.min_delta = 2, 0.0
    weights = {}
    for acc in (0.5, 0.7, 0.6, 0.7):  # best at epoch 1; epochs 2 and 3 bring no gain -> stop
        with torch.no_grad():
            dist.student.classifier.weight.add_(1.0)
        weights[runner.state.student_epoch] = dist.student.classifier.weight.detach().clone()
        runner._track_best(acc)
        runner.state.student_epoch += 1
    st = runner.state
    assert (st.best_val, st.best_epoch, st.bad_epochs, st.stopped_early) == (0.7, 1, 2, True)
    runner.load_best()
    assert torch.equal(dist.student.classifier.weight, weights[1])  # not the last epoch's weights


def test_teachers_fall_back_to_the_newest_finished_finetune_run(workdir):
    from asib_core.config import resolve_experiment
    from asib_core.models import create_model
    from asib_core.pipeline.models import save_teacher
    from asib_core.pipeline.teachers import resolve_teachers

    client = MlflowClient()
    exp = client.create_experiment("digits")
    made = {}
    for name, status in (("old", "FINISHED"), ("new", "FINISHED"), ("newest-failed", "FAILED")):
        for teacher in ("resnet20", "wrn_16_2"):
            run = client.create_run(exp, tags={"step": "finetune", "teacher": teacher, "dataset": "digits",
                                               "class_subset": "all",
                                               "asib.teacher_artifact": f"teacher/{teacher}_digits.pth"})
            path = workdir / name / f"{teacher}_digits.pth"
            path.parent.mkdir(exist_ok=True)
            save_teacher(create_model(teacher, num_classes=10, small_input=True), path, {"teacher": teacher})
            client.log_artifact(run.info.run_id, str(path), "teacher")
            client.set_terminated(run.info.run_id, status)
            made[name, teacher] = run.info.run_id
        time.sleep(0.01)  # distinct start times
    cfg = resolve_experiment("quickstart", []).cfg
    sources = resolve_teachers(cfg)
    assert [(s.role, s.run_id) for s in sources] == [("teacher1", made["new", "resnet20"]),
                                                    ("teacher2", made["new", "wrn_16_2"])]
    assert sources[0].path.read_bytes() == (workdir / "new" / "resnet20_digits.pth").read_bytes()
