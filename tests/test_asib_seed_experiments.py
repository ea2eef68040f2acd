"""Issue 6: every seed experiment runs one tiny stage of ASIB end to end through
``asib_core.pipeline.distill.run_distill`` (digits, resnet20 + wrn_16_2 -> resnet8, teacher
checkpoints saved with ``save_teacher``, a temporary MLflow sqlite store and working dir)."""
from __future__ import annotations

import os

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from asib_core.models import create_model
from asib_core.pipeline.models import save_teacher
from tests.asib_helpers import TEACHERS, trained_teacher_states

pytestmark = pytest.mark.slow   # end to end through MLflow: ~40 s of CPU for the eight runs

SEED_EXPERIMENTS = ["L0_baseline", "L1_ib", "L2_cccp", "L3_ib_cccp_tadapt", "L4_full", "side_cccp_ppf",
                    "overlap_100", "sota_generic"]
NO_A_STEP = {"L0_baseline", "overlap_100"}      # teacher_adapt_epochs: 0 in the seed file


@pytest.fixture(scope="module")
def store(request, tmp_path_factory):
    """One working dir + sqlite store for the module; teacher checkpoints saved in it."""
    work = tmp_path_factory.mktemp("asib_seed")
    cache = request.config.cache.mkdir("asib_teachers") if request.config.cache else work / "cache"
    states = trained_teacher_states(cache)
    paths = []
    for name in TEACHERS:
        model = create_model(name, num_classes=10, pretrained=False, small_input=True)
        model.load_state_dict(states[name])
        path = work / f"{name}_digits.pth"
        save_teacher(model, path, {"teacher": name})
        paths.append(path)
    mp = pytest.MonkeyPatch()
    mp.chdir(work)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        mp.delenv(key, raising=False)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {"work": work, "paths": paths}
    torch.set_num_threads(threads)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mp.undo()


def tiny_overrides(exp: str, paths) -> list[str]:
    ov = ["dataset=digits", "teacher1=resnet20", "teacher2=wrn_16_2", "student=resnet8",
          f"experiment.teacher1_ckpt={paths[0]}", f"experiment.teacher2_ckpt={paths[1]}",
          "experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
          "experiment.device=cpu", "experiment.use_amp=false", "experiment.distill_out_dim=64",
          "experiment.dataset.train_per_class=2", "experiment.dataset.val_split=0.02",
          "experiment.dataset.batch_size=16"]
    if exp not in NO_A_STEP:
        ov.append("experiment.teacher_adapt_epochs=1")
    if exp == "L4_full":   # the last stage's levels of the 4-stage schedules
        ov += [f"experiment.{role}_freeze_level_schedule=[1]" for role in ("student", "teacher1", "teacher2")]
    return ov


@pytest.mark.parametrize("exp", SEED_EXPERIMENTS)
def test_seed_experiment_runs_one_tiny_asib_stage(store, exp):
    from asib_core.config import resolve_experiment
    from asib_core.pipeline.distill import run_distill
    from asib_core.pipeline.evaluate import run_evaluate

    result = run_distill(exp, tiny_overrides(exp, store["paths"]))
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "asib"
    metrics = run.data.metrics
    # the logged student, reloaded and evaluated on the test split by the evaluate step
    evaluated = client.get_run(run_evaluate(result.run_id).run_id).data.metrics
    assert metrics["test/acc"] == pytest.approx(evaluated["test/acc"], abs=1e-6)
    threshold = resolve_experiment(exp, tiny_overrides(exp, store["paths"])).cfg["enable_kd_after_syn_acc"]
    if exp in NO_A_STEP:
        assert "a_step/loss" not in metrics
        assert metrics["gate/open"] == 0.0 and metrics["gate/synergy_trained"] == 0.0  # never trained
    else:
        assert metrics["gate/synergy_trained"] == 1.0 and metrics["gate/syn_acc"] == metrics["a_step/syn_acc"]
        assert metrics["gate/open"] == float(metrics["a_step/syn_acc"] >= threshold)
    if exp in ("L2_cccp", "L3_ib_cccp_tadapt", "L4_full", "side_cccp_ppf"):
        # one A-step epoch: the window is min(synergy_only_epochs, 0) = 0, so CCCP is on
        assert metrics["a_step/cccp"] > 0
    if exp in ("L1_ib", "L3_ib_cccp_tadapt", "L4_full"):
        assert metrics["a_step/ib_kl"] > 0
    if exp in ("L4_full", "side_cccp_ppf"):
        assert metrics["ppf/student_level"] == 1.0
        full = create_model("resnet8", num_classes=10, pretrained=False, small_input=True, distill_out_dim=64)
        assert metrics["ppf/student_trainable_params"] < sum(p.numel() for p in full.parameters())
    history = client.get_metric_history(result.run_id, "val/acc")
    assert len(history) == 1
