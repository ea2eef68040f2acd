"""What a training run records about its inputs before it trains: the flattened config as
params, the effective config as a file, and its three data splits as MLflow dataset inputs.

Each split is one MLflow dataset (``<dataset>-<split>``, context ``train``/``val``/``test``)
whose digest is the split's fingerprint (:func:`asib_core.data.identity.split_fingerprint`,
first 32 hex digits; the whole SHA-256 is in the profile): two runs trained on the same images
show the same digest in the UI's Datasets column.
"""
from __future__ import annotations

import json

import mlflow
import numpy as np
import yaml
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient

from asib_core.data.identity import split_fingerprint
from asib_core.tracking.params import log_config_params

SPLITS = ("train", "val", "test")
DIGEST_CHARS = 32   # MLflow stores at most 36 characters of a digest


def log_run_inputs(run_id: str, cfg: dict, data) -> None:
    log_config_params(run_id, cfg)
    mlflow.log_text(yaml.safe_dump(cfg, sort_keys=True), "config/effective_config.yaml", run_id=run_id)
    log_datasets(run_id, data)


def _schema(ds) -> str:
    from mlflow.types import Schema, TensorSpec

    features = Schema([TensorSpec(np.dtype(ds.images.dtype), (-1, *ds.images.shape[1:]), "image")])
    targets = Schema([TensorSpec(np.dtype(np.int64), (-1,), "label")])
    return json.dumps({"mlflow_tensorspec": {"features": features.to_json(), "targets": targets.to_json()}})


def dataset_entity(data, split: str) -> Dataset:
    ds = data.split(split)
    fingerprint = split_fingerprint(data, split)
    profile = {"num_rows": len(ds), "num_classes": int(data.num_classes), "split": split,
               "sha256": fingerprint, "mean": list(data.mean), "std": list(data.std)}
    return Dataset(name=f"{data.name}-{split}", digest=fingerprint[:DIGEST_CHARS], source_type="local",
                   source=json.dumps({"uri": str(data.root or data.name)}), schema=_schema(ds),
                   profile=json.dumps(profile))


def log_datasets(run_id: str, data) -> None:
    """The train, val and test splits as the run's dataset inputs (one store call)."""
    inputs = [DatasetInput(dataset_entity(data, split), tags=[InputTag("mlflow.data.context", split)])
              for split in SPLITS]
    MlflowClient().log_inputs(run_id, datasets=inputs)
