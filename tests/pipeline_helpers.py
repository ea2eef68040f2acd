"""Helpers of the pipeline tests: tiny settings, subprocess runners, store queries."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
# the quickstart's own student recipe (10 images per class, batch 16, 60 epochs) is for showing KD;
# the tests keep a few large batches per epoch
TINY_DISTILL = ["experiment.student_epochs_per_stage=[2]", "experiment.dataset.train_per_class=20",
                "experiment.dataset.batch_size=64", "experiment.eval_batch_size=256"]
TINY_FINETUNE = ["finetune_epochs=2", "dataset.train_per_class=20"]


def default_ctrl_c() -> None:
    """Give a child Ctrl-C as a terminal gives it (``preexec_fn``): pytest-xdist workers, and
    commands a shell starts in the background, ignore SIGINT, and an ignored signal is
    inherited, so Python in the child would never raise KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def env_for(workdir: Path) -> dict:
    env = dict(os.environ)
    env.update({"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "ASIB_NO_PROGRESS": "1",
                "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true"})
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "ASIB_WORKDIR"):
        env.pop(key, None)
    return env


def run_module(module: str, args: list[str], workdir: Path, timeout: int = 600, **kw):
    return subprocess.run([sys.executable, "-m", module, *args], cwd=workdir, env=env_for(workdir),
                          capture_output=True, text=True, timeout=timeout, **kw)


def all_runs(workdir: Path):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, max_results=1000) if ids else []


def runs_by_step(workdir: Path, step: str):
    return [r for r in all_runs(workdir) if r.data.tags.get("step") == step]


def use_isolated_store(mp, workdir: Path) -> None:
    """Point cwd and MLflow at ``workdir`` (its own sqlite store) inside a MonkeyPatch context."""
    mp.chdir(workdir)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"):
        mp.delenv(key, raising=False)
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
