"""Issue 15: the distilled student is an MLflow model (logged, registered, evaluable and servable
without any teacher), on real digits with tiny settings."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.pipeline_helpers import env_for, use_isolated_store

TINY_FT = ["finetune_epochs=1", "dataset.train_per_class=10"]
TINY = ["experiment.student_epochs_per_stage=[1]", "experiment.dataset.train_per_class=10",
        "experiment.dataset.batch_size=64", "experiment.eval_batch_size=256"]
SIMKD_NAME = "digits-quickstart-simkd-resnet8"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two tiny teachers, a SimKD student (logged as an MLflow model) and a CE student with
    log_model=false; then every teacher checkpoint is destroyed."""
    from asib_core.pipeline.distill import run_distill
    from asib_core.pipeline.finetune import run_finetune

    work = tmp_path_factory.mktemp("student_model")
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, work)
        teachers = [run_finetune(t, "digits", TINY_FT) for t in ("resnet20", "wrn_16_2")]
        simkd = run_distill("quickstart", [*TINY, "method=simkd"])
        plain = run_distill("quickstart", [*TINY, "method=ce", "experiment.log_model=false"])
        client = MlflowClient()
        for ft in teachers:  # no teacher checkpoint is left anywhere
            shutil.rmtree(Path(client.get_run(ft.run_id).info.artifact_uri.removeprefix("file://")))
        shutil.rmtree(work / "checkpoints" / "teachers")
        yield {"work": work, "simkd": simkd, "plain": plain}


def test_distill_logs_and_registers_the_deployable_student(store):
    import mlflow
    from mlflow.models import Model

    from asib_core.methods.simkd import SimKDDeployed

    run_id = store["simkd"].run_id
    info = Model.load(f"runs:/{run_id}/model")
    meta = info.metadata
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["num_classes"] == 10
    assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and meta["input_size"] == [3, 32, 32]
    assert meta["method"] == "simkd" and meta["source_run_id"] == run_id
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 32, 32)
    assert info.signature.outputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 10)
    assert info.saved_input_example_info is not None
    # SimKD's deployable network is student + projector + the borrowed teacher head
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert isinstance(model, SimKDDeployed)
    version = MlflowClient().get_model_version(SIMKD_NAME, "1")
    assert version.run_id == run_id
    assert MlflowClient().get_run(run_id).data.tags["asib.registered_model"] == f"models:/{SIMKD_NAME}/1"


def test_log_model_false_logs_no_model_and_evaluate_still_works(store):
    from asib_core.pipeline.evaluate import run_evaluate

    run = MlflowClient().get_run(store["plain"].run_id)
    assert "asib.model_uri" not in run.data.tags
    assert not [a for a in MlflowClient().list_artifacts(run.info.run_id, "model") if a.path.endswith("MLmodel")]
    result = run_evaluate(run.info.run_id)  # rebuilt from model/student.pt (CE: no teacher needed)
    assert result.metrics["test/acc"] == pytest.approx(run.data.metrics["test/acc"])


@pytest.mark.parametrize("form", ["run_id", "runs", "models"])
def test_evaluate_takes_a_run_id_or_model_uri_and_needs_no_teacher(store, form):
    from asib_core.pipeline.evaluate import run_evaluate

    run_id = store["simkd"].run_id
    target = {"run_id": run_id, "runs": f"runs:/{run_id}/model", "models": f"models:/{SIMKD_NAME}/1"}[form]
    result = run_evaluate(target)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["source_run"] == run_id
    # the evaluated network is the one the distill run tested: same test accuracy
    assert result.metrics["test/acc"] == pytest.approx(store["simkd"].metrics["test/acc"])
    assert "test/agreement_teacher1" not in result.metrics  # the teachers are gone


def test_evaluate_refuses_a_uri_without_a_model(store):
    from asib_core.errors import MissingArtifactError
    from asib_core.pipeline.evaluate import run_evaluate

    with pytest.raises(MissingArtifactError, match="no MLflow model at 'models:/nope/1'"):
        run_evaluate("models:/nope/1")


def test_mlflow_models_predict_gives_the_predictions_of_evaluate(store, tmp_path):
    from asib_core.data import build_data
    from asib_core.pipeline.evaluate import run_evaluate

    import mlflow
    import yaml

    run_id = store["simkd"].run_id
    evaluated = run_evaluate(run_id).run_id
    rows = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=evaluated, artifact_path="predictions.csv"))
    cfg = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="config/effective_config.yaml")).read_text())
    x, _, idx = next(iter(build_data(cfg, "cpu").loader("test", batch_size=40)))
    (tmp_path / "in.json").write_text(json.dumps({"inputs": x.numpy().tolist()}))
    out = subprocess.run([sys.executable, "-m", "mlflow", "models", "predict", "-m", f"runs:/{run_id}/model",
                          "-i", str(tmp_path / "in.json"), "-o", str(tmp_path / "out.json"), "--env-manager", "local"],
                         cwd=store["work"], env=env_for(store["work"]), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    served = np.asarray(json.loads((tmp_path / "out.json").read_text())["predictions"]).argmax(1)
    assert list(served) == list(rows.set_index("index").loc[idx.numpy(), "predicted"])
