"""Issue 15: a run's datasets and system metrics in the MLflow UI."""
from __future__ import annotations

import threading
import time

import pytest
from mlflow.tracking import MlflowClient

MONITOR = "SystemMetricsMonitor"


def _monitors() -> list:
    return [t for t in threading.enumerate() if t.name == MONITOR and t.is_alive()]


def test_system_metrics_are_on_by_default_and_stop_with_the_run(workdir, monkeypatch):
    from asib_core.tracking import configure_tracking, open_run

    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)  # tests switch it off
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    configure_tracking()
    with open_run(experiment="Default", run_name="sampled", tags={}) as run:
        assert len(_monitors()) == 1
        deadline = time.monotonic() + 120  # a liveness wait, not a timing assertion
        while "system/cpu_utilization_percentage" not in MlflowClient().get_run(run.run_id).data.metrics:
            assert time.monotonic() < deadline, "no system metric was logged"
            time.sleep(0.05)
    assert not _monitors()  # the sampler ends with its run
    assert "system/system_memory_usage_megabytes" in MlflowClient().get_run(run.run_id).data.metrics


def test_system_metrics_switch_off(workdir, monkeypatch):
    from asib_core.tracking import configure_tracking, open_run

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    configure_tracking()
    with open_run(experiment="Default", run_name="quiet", tags={}):
        assert not _monitors()


def test_a_run_logs_its_three_splits_with_their_fingerprints(workdir):
    from asib_core.data import build_data
    from asib_core.data.identity import content_fingerprint
    from asib_core.pipeline.finetune import finetune_config, run_finetune

    over = ["finetune_epochs=1", "dataset.train_per_class=10"]
    result = run_finetune("resnet20", "digits", over)
    inputs = MlflowClient().get_run(result.run_id).inputs.dataset_inputs
    by_context = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_context) == {"train", "val", "test"}
    data = build_data(finetune_config("resnet20", "digits", over), "cpu")
    assert by_context["test"].digest == content_fingerprint(data.test.images, data.test.labels)[:32]
    assert by_context["train"].name == "digits-train" and len({d.digest for d in by_context.values()}) == 3


@pytest.mark.parametrize("other", [{"train_per_class": 6}, {"split_seed": 7}])
def test_split_fingerprint_names_the_images(other):
    """Two splits get the same digest exactly when they hold the same images and labels."""
    import numpy as np

    from asib_core.data import build_data
    from asib_core.data.identity import split_fingerprint

    base = {"name": "digits", "train_per_class": 5}
    a = build_data({"seed": 0, "dataset": base}, "cpu")
    b = build_data({"seed": 0, "dataset": {**base, **other}}, "cpu")
    for split in ("train", "val", "test"):
        same = all(np.array_equal(getattr(a.split(split), k), getattr(b.split(split), k)) for k in ("images", "labels"))
        assert (split_fingerprint(a, split) == split_fingerprint(b, split)) == same, split
    assert split_fingerprint(a, "train") != split_fingerprint(b, "train")
    assert split_fingerprint(a, "train") == split_fingerprint(build_data({"seed": 0, "dataset": base}, "cpu"), "train")
