"""Issue 4: finetune -> distill -> evaluate on real digits, in-process, tiny settings."""
from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from asib_core.config import ConfigError
from asib_core.errors import MissingArtifactError
from asib_core.data import DatasetNotFoundError

from fault_helpers import final_metrics, metric_histories
from pipeline_helpers import TINY_DISTILL, TINY_FINETUNE, all_runs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny teachers fine-tuned and one vanilla-KD student distilled, in one store."""
    import os

    import mlflow

    from asib_core.pipeline.distill import run_distill
    from asib_core.pipeline.finetune import run_finetune

    work = tmp_path_factory.mktemp("pipeline")
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    try:
        ft1 = run_finetune("resnet20", "digits", TINY_FINETUNE)
        ft2 = run_finetune("wrn_16_2", "digits", TINY_FINETUNE)
        dist = run_distill("quickstart", TINY_DISTILL)
        yield {"work": work, "ft": [ft1, ft2], "distill": dist}
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri


def test_finetune_logs_checkpoint_and_tags(trained, tmp_path):
    client = MlflowClient()
    for result, teacher in zip(trained["ft"], ("resnet20", "wrn_16_2")):
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        tags = run.data.tags
        assert tags["step"] == "finetune" and tags["teacher"] == teacher and tags["dataset"] == "digits"
        assert len(tags["config_sha256"]) == 64
        names = {a.path for a in client.list_artifacts(result.run_id, "teacher")}
        assert names == {f"teacher/{teacher}_digits.pth"}
        artifact = client.download_artifacts(result.run_id, f"teacher/{teacher}_digits.pth", str(tmp_path))
        # the logged test accuracy is the logged teacher's, recomputed here from its checkpoint
        assert run.data.metrics["test/acc"] == pytest.approx(teacher_test_acc(teacher, artifact), abs=1e-6)
        local = trained["work"] / f"checkpoints/teachers/{teacher}_digits.pth"
        assert local.read_bytes() == open(artifact, "rb").read()


def teacher_test_acc(teacher: str, path: str) -> float:
    import torch

    from asib_core.data import build_data
    from asib_core.engine.loop import evaluate
    from asib_core.pipeline.finetune import build_teacher, finetune_config

    cfg = finetune_config(teacher, "digits", TINY_FINETUNE)
    model = build_teacher(cfg, 10)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["model"])
    model.eval()
    loader = build_data(cfg).loader("test", batch_size=256)
    return evaluate(lambda x: model(x)["logit"], loader)["acc"]


def test_distill_uses_finetuned_teachers_and_logs_per_epoch(trained, tmp_path):
    from asib_core.config import resolve_experiment
    from asib_core.pipeline.distill import run_identity

    client = MlflowClient()
    run = client.get_run(trained["distill"].run_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["method"] == "vanilla_kd" and tags["teachers"] == "resnet20+wrn_16_2"
    assert tags["student"] == "resnet8" and tags["exp"] == "quickstart"
    assert run.info.run_name == "quickstart vanilla_kd resnet8 <- resnet20+wrn_16_2"
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.step for m in history] == [0, 1]
    for key in ("train/loss", "train/ce", "train/kd", "lr", "tau", "img_per_s", "epoch_time"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert run.data.params["method_name"] == "vanilla_kd" and run.data.params["dataset.name"] == "digits"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "config", "accuracy_curves.png", "history.json"} <= artifacts
    assert "teacher1/val_acc" in run.data.metrics and "teachers/disagreement" in run.data.metrics
    # the run's identity holds the SHA-256 of its teacher files: those of the fine-tune artifacts
    artifacts = [client.download_artifacts(ft.run_id, f"teacher/{name}_digits.pth", str(tmp_path / name))
                 for ft, name in zip(trained["ft"], ("resnet20", "wrn_16_2"))]
    cfg = resolve_experiment("quickstart", TINY_DISTILL).cfg
    assert tags["asib.identity"] == run_identity(cfg, artifacts)


def test_evaluate_logs_its_metrics_and_artifacts_and_its_accuracy_back_to_the_source_run(trained):
    from asib_core.pipeline.evaluate import run_evaluate

    source = trained["distill"].run_id
    result = run_evaluate(source)
    client = MlflowClient()
    run = client.get_run(result.run_id)
    metrics = run.data.metrics
    for key in ("test/acc", "test/top5", "test/nll", "test/ece", "test/agreement_teacher1",
                "test/agreement_teacher2", "params", "flops_per_image", "inference_img_per_s"):
        assert key in metrics, key
    assert metrics["test/top5"] >= metrics["test/acc"]
    assert run.data.tags["source_run"] == source and run.data.tags["step"] == "evaluate"
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"per_class_accuracy.csv", "confusion_matrix.png"} <= artifacts
    src = client.get_run(source).data.metrics
    assert src["eval/acc"] == pytest.approx(metrics["test/acc"])
    # the distill run's own best-on-validation test number agrees with evaluate
    assert src["test/acc"] == pytest.approx(metrics["test/acc"])


def test_evaluate_rejects_unknown_run(trained):
    from asib_core.pipeline.evaluate import run_evaluate

    with pytest.raises(MissingArtifactError, match="no run with id 'nope'"):
        run_evaluate("nope")


def test_no_run_left_running(trained):
    assert all(r.info.status != "RUNNING" for r in all_runs(trained["work"]))


def test_missing_teachers_print_the_finetune_command(workdir):
    from asib_core.pipeline.distill import run_distill

    with pytest.raises(MissingArtifactError) as err:
        run_distill("quickstart", TINY_DISTILL)
    message = str(err.value)
    assert "checkpoints/teachers/resnet20_digits.pth" in message
    assert "mlflow run . --env-manager local -e finetune -P teacher=resnet20 -P dataset=digits" in message


def test_missing_dataset_names_path_and_how_to_get_it(workdir):
    from asib_core.pipeline.distill import run_distill

    with pytest.raises(DatasetNotFoundError) as err:
        run_distill("quickstart", ["dataset=cifar100", f"experiment.dataset.root={workdir / 'nodata'}"])
    message = str(err.value)
    assert str(workdir / "nodata") in message and "download" in message
    assert all(r.info.status != "RUNNING" for r in all_runs(workdir))


def test_unknown_method_is_refused(workdir):
    from asib_core.pipeline.distill import run_distill

    with pytest.raises(ConfigError):
        run_distill("quickstart", ["method=telepathy"])


def test_safe_retry_recovers_from_a_nonfinite_loss_with_the_uninterrupted_result_and_hash(trained, monkeypatch):
    from asib_core.pipeline.distill import run_distill

    monkeypatch.chdir(trained["work"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained['work'] / 'mlflow.db'}")
    result = run_distill("quickstart", [*TINY_DISTILL, "experiment.checkpoint_dir=retry"],
                         inject_nonfinite=(1, 1, 1))  # after one update of epoch 1
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "non-finite loss at batch 1 of epoch 1" in run.data.tags["asib.safe_retry"]
    assert run.data.metrics["safe_retry"] == 1.0 and result.metrics["epochs_trained"] == 2.0
    normal = MlflowClient().get_run(trained["distill"].run_id)
    # the retry restored the state of epoch 0 (RNG included): the same result as without a fault
    assert final_metrics(run) == final_metrics(normal) and len(final_metrics(run)) == 6
    curves = metric_histories(run.info.run_id, trained["work"])
    assert curves.pop("safe_retry") == [(1, 1.0)]
    normal_curves = metric_histories(normal.info.run_id, trained["work"])
    assert (curves.pop("safe_retries"), normal_curves.pop("safe_retries")) == ([(2, 1.0)], [(2, 0.0)])
    # (test_evaluate may have copied its eval/* headline onto the normal run: not compared)
    assert curves == {k: v for k, v in normal_curves.items() if not k.startswith("eval/")}
    # the hash: a lock built here from the config the run logged (checkpoint_dir differs from `normal`)
    import yaml

    from asib_core.config import ConfigLock
    logged = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{result.run_id}/config/effective_config.yaml"))
    assert logged["checkpoint_dir"] == "retry"
    assert run.data.tags["config_sha256"] == ConfigLock(logged).sha256 != normal.data.tags["config_sha256"]


def test_second_nonfinite_loss_ends_the_run_failed(trained, monkeypatch):
    from asib_core.pipeline.distill import run_distill

    monkeypatch.chdir(trained["work"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{trained['work'] / 'mlflow.db'}")
    with pytest.raises(RuntimeError, match="SAFE-RETRY failed"):
        run_distill("quickstart", [*TINY_DISTILL, "experiment.checkpoint_dir=retry2"], inject_nonfinite=(0, 0, 2))
    failed = [r for r in all_runs(trained["work"]) if r.data.params.get("checkpoint_dir") == "retry2"]
    assert len(failed) == 1 and failed[0].info.status == "FAILED"
    assert "SAFE-RETRY failed" in failed[0].data.tags["asib.error"]
