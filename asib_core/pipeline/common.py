"""Small pieces every step shares: seeding, git commit, file hashes, run tags."""
from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

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


def run_tags(cfg: dict, step: str, sha: str, **extra) -> dict:
    tags = {
        "exp": cfg.get("exp", ""), "method": cfg.get("method_name", ""), "step": step,
        "dataset": cfg["dataset"]["name"], "seed": cfg.get("seed", ""),
        "config_sha256": sha, "git_commit": git_commit(),
    }
    tags.update(extra)
    return {k: v for k, v in tags.items() if v is not None}


def run_time_metrics(history: list[dict]) -> dict:
    """Throughput and training time of a finished fit, under the names every step logs."""
    rates = [h["img_per_s"] for h in history if h.get("img_per_s") is not None]
    return {"train/img_per_s_mean": sum(rates) / len(rates) if rates else float("nan"),
            "total_train_time_sec": sum(h.get("epoch_time", 0.0) for h in history)}


def resume_target(state_dir: Path) -> str | None:
    """The unfinished run a checkpoint directory belongs to (None: start fresh).

    A checkpoint of a FINISHED run (or of a run the store no longer has) is removed.
    """
    import mlflow
    from asib_core.engine.state import load_state

    last = Path(state_dir) / "last.pt"
    if not last.exists():
        return None
    run_id = load_state(last).get("run_id")
    try:
        status = mlflow.get_run(run_id).info.status if run_id else None
    except Exception:  # noqa: BLE001 - unknown run id in this store: start fresh
        status = None
    if status in ("RUNNING", "FAILED", "KILLED", "SCHEDULED"):
        return run_id
    shutil.rmtree(state_dir, ignore_errors=True)
    return None
