"""Shared fixtures. Every test that tracks runs gets its own temporary MLflow store and
working directory: tests never touch the repository's mlflow.db or mlruns/."""
from __future__ import annotations

import os

# One intra-op thread per process: the suite runs one xdist worker per core (pyproject.toml), and
# torch's default of one thread per core in every worker and subprocess only oversubscribes the CPU.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import pytest  # noqa: E402

from asib_core.tracking.environ import set_environ  # noqa: E402

os.environ.setdefault("ASIB_NO_PROGRESS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# System metrics are on by default (asib_core/tracking/runs.py); their sampler threads would write
# to the tests' sqlite stores next to the runs. Off here; tests/test_run_inputs.py checks the default.
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory with its own sqlite tracking store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    import mlflow
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield tmp_path
    while mlflow.active_run() is not None:
        mlflow.end_run()


LEAK_GUARDED = ("ASIB_WORKDIR", "MLFLOW_RUN_ID", "ASIB_ARTIFACT_ROOT")


@pytest.fixture(autouse=True)
def no_leaked_process_state():
    """A test (or the code it calls in-process) must leave the working directory and the
    variables that steer later commands as it found them: a leaked ``ASIB_WORKDIR`` once sent
    every later in-process entry point into another test's directory."""
    cwd, env = os.getcwd(), {key: os.environ.get(key) for key in LEAK_GUARDED}
    yield
    leaked = [f"cwd {cwd} -> {os.getcwd()}"] if os.getcwd() != cwd else []
    leaked += [f"${key} {value!r} -> {os.environ.get(key)!r}" for key, value in env.items()
               if os.environ.get(key) != value]
    os.chdir(cwd)
    set_environ(env)
    if leaked:
        pytest.fail("the test left process state behind: " + "; ".join(leaked))
