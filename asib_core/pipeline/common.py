"""Small pieces every step shares: seeding, git commit, file hashes, run tags."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from asib_core.code_version import code_version
from asib_core.engine.state import StateFolder

log = logging.getLogger("asib")


def setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("ASIB_LOG_LEVEL", "INFO"),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def seed_everything(seed: int, deterministic: bool = True) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:
        torch.backends.cudnn.benchmark = True


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def teacher_names(cfg: dict) -> list[str]:
    return [cfg[k]["name"] for k in ("teacher1", "teacher2") if isinstance(cfg.get(k), dict) and cfg[k].get("name")]


def early_stopping(cfg: dict) -> dict:
    """The early-stopping fields of a FitSpec, for distillation and fine-tuning alike:
    ``early_stopping_min_delta`` is in percentage points of validation top-1 (0.1 = 0.1 %)."""
    return {"patience": int(cfg.get("early_stopping_patience") or 0),
            "min_delta_pp": float(cfg.get("early_stopping_min_delta") or 0.0)}


def run_tags(cfg: dict, step: str, sha: str, **extra) -> dict:
    tags = {
        "exp": cfg.get("exp", ""), "exp_id": cfg.get("exp_id"), "method": cfg.get("method_name", ""), "step": step,
        "dataset": cfg["dataset"]["name"], "seed": cfg.get("seed", ""),
        "config_sha256": sha, "git_commit": git_commit(), "asib.code_version": code_version(),
    }
    tags.update(extra)
    return {k: v for k, v in tags.items() if v is not None}


def run_time_metrics(history: list[dict]) -> dict:
    """Throughput and training time of a finished fit, under the names every step logs."""
    rates = [h["img_per_s"] for h in history if h.get("img_per_s") is not None]
    return {"train/img_per_s_mean": sum(rates) / len(rates) if rates else float("nan"),
            "total_train_time_sec": sum(h.get("epoch_time", 0.0) for h in history)}


STATE_TAG = "asib.state_dir"
#: a distill run's tag naming the teachers its method's losses read ("none" for CE-only)
TEACHERS_USED_TAG = "asib.teachers_used"
_UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")


@contextlib.contextmanager
def resumable_state(state_dir: Path, identity: str, *, enabled: bool = True):
    """Hold a step's state folder for the whole step and find the run it continues.

    Yields ``(folder, resume_run_id)``. The folder's lock makes this process its only writer
    (a second identical command is refused: :class:`~asib_core.errors.StateInUse`); ``enabled``
    is False on the non-zero ranks of a distributed run (rank 0 holds the folder)."""
    folder = StateFolder(state_dir)
    if not enabled:
        yield folder, None
        return
    with folder.claim():
        yield folder, resume_target(folder, identity)


def resume_target(folder: StateFolder, identity: str) -> str | None:
    """The unfinished run a state folder continues (None: a new run starts).

    1. A readable checkpoint (``last.pt``, else ``prev.pt``: an unreadable file is said in
       one sentence and moved aside as ``*.corrupt``) names its run: that run is resumed
       from it, unless it FINISHED or the store no longer has it (the folder is cleared).
    2. No checkpoint file at all: the newest run of this folder that ended before its first
       checkpoint (killed - closed as an orphan, ``owners.py`` - failed or interrupted) is
       resumed from its beginning.
    3. Checkpoint files, none readable: that run stays KILLED (tag ``asib.orphan`` says why),
       the folder is cleared and a new run starts from the beginning.
    """
    from mlflow.tracking import MlflowClient

    from asib_core.tracking.owners import ORPHAN_TAG, close_orphans

    close_orphans()
    had_files = folder.has_checkpoint_files()
    payload, path, problems = folder.latest_checkpoint()
    for problem in problems:
        log.warning("%s", problem)
    if payload is not None:
        run_id = payload.get("run_id")
        if _run_status(run_id) in _UNFINISHED:
            if problems:
                log.warning("run %s resumes from the previous good checkpoint %s", run_id, path.name)
            return run_id
        folder.clear()
        return None
    orphans = _unfinished_runs(folder, identity)
    if had_files:
        client = MlflowClient()
        for run in orphans:
            client.set_tag(run.info.run_id, ORPHAN_TAG, f"its checkpoints in {folder.path} are unreadable; "
                                                        "the step started again as a new run")
        log.warning("no readable checkpoint in %s: the step starts again from its beginning, as a new run",
                    folder.path)
        folder.clear()
        return None
    if orphans:
        run_id = orphans[0].info.run_id
        log.warning("run %s ended before its first checkpoint: it starts again from its beginning", run_id)
        return run_id
    return None


def _run_status(run_id: str | None) -> str | None:
    import mlflow

    if not run_id:
        return None
    try:
        run = mlflow.get_run(run_id)
    except Exception:  # noqa: BLE001 - unknown run id in this store: start fresh
        return None
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def _unfinished_runs(folder: StateFolder, identity: str) -> list:
    """Runs of this folder that ended without finishing (closed as orphans, failed, interrupted;
    not pruned, not pointers to a resumed run), newest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    runs = client.search_runs(experiment_ids, f"tags.`asib.identity` = '{identity}'",
                              order_by=["attributes.start_time DESC"], max_results=200)
    skip = ("asib.pruned", "asib.resumed_into")
    return [r for r in runs if r.info.status in ("KILLED", "FAILED") and r.data.tags.get(STATE_TAG) == folder.key
            and not any(t in r.data.tags for t in skip)]
