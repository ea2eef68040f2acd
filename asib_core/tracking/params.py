"""Log the flattened effective config as params within MLflow's limits (never a crash)."""
from __future__ import annotations

import json

import mlflow
from mlflow.entities import Param

from asib_core.config.lock import flatten

MAX_KEY = 250
MAX_VALUE = 6000
BATCH = 100


def param_items(cfg: dict) -> dict[str, str]:
    items = {}
    for key, value in flatten(cfg).items():
        if key.startswith("_") or ".__" in key:
            continue
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        if len(text) > MAX_VALUE:
            text = text[: MAX_VALUE - 15] + "...[truncated]"
        items[key[:MAX_KEY]] = text
    return items


def log_config_params(run_id: str, cfg: dict) -> None:
    """Log params once; on resume, params already logged are skipped (same values)."""
    client = mlflow.tracking.MlflowClient()
    existing = client.get_run(run_id).data.params
    items = [Param(k, v) for k, v in param_items(cfg).items() if k not in existing]
    for i in range(0, len(items), BATCH):
        client.log_batch(run_id, params=items[i:i + BATCH])
