"""The distilled student as an MLflow model.

Every distill run logs its deployable network (what ``forward_test`` runs: the student, and for
SimKD its projector and the borrowed teacher head; never a teacher) with
``mlflow.pytorch.log_model`` under the name :data:`MODEL_NAME`, so ``runs:/<run id>/model``
and ``models:/<registered name>/<version>`` load it anywhere the asib-kd package is importable
(``pip install -e .``; the pickled module refers to its classes). It carries

* a signature: input ``float32 [-1, 3, H, W]`` (normalised images), output ``float32
  [-1, num_classes]`` (logits), and an input example (two normalised test images);
* metadata: the class names, the preprocessing (``mean``, ``std``, ``input_size``, how to
  normalise), the dataset, experiment, method, student, teachers, config hash and source run.

It is registered in the store's model registry as ``<dataset>-<exp>-<method>-<student>``
(:func:`registered_name`); the run's tag ``asib.model_uri`` holds the logged model's URI. The key
``log_model: false`` switches all of this off (the run then keeps only ``model/student.pt``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import re

import mlflow
import numpy as np
import torch

MODEL_NAME = "model"
MODEL_TAG = "asib.model_uri"
EXAMPLE_IMAGES = 2
INPUT_NOTE = ("float32 [N, 3, H, W]: RGB pixels scaled to [0, 1], then (x - mean) / std per channel "
              "(mean, std and input_size in this metadata)")
OUTPUT_NOTE = "float32 [N, num_classes] logits; argmax = index into class_names"

log = logging.getLogger("asib.model")


def registered_name(cfg: dict) -> str:
    """The model registry name of a run's student: ``<dataset>-<exp>-<method>-<student>``."""
    parts = [cfg["dataset"]["name"], cfg["exp"], cfg["method_name"], cfg["model"]["student"]["name"]]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(str(p) for p in parts))


def model_metadata(cfg: dict, data, sha: str, run_id: str, input_size: list[int]) -> dict:
    from .common import teacher_names

    return {
        "class_names": [str(c) for c in data.class_names], "num_classes": int(data.num_classes),
        "mean": [float(m) for m in data.mean], "std": [float(s) for s in data.std],
        "input_size": input_size, "input": INPUT_NOTE, "output": OUTPUT_NOTE,
        "dataset": cfg["dataset"]["name"], "exp": cfg["exp"], "method": cfg["method_name"],
        "student": cfg["model"]["student"]["name"], "teachers": teacher_names(cfg),
        "config_sha256": sha, "source_run_id": run_id,
    }


def _signature(example: np.ndarray, num_classes: int):
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(num_classes)))]))


def _requirements() -> list[str]:
    """Pinned explicitly: MLflow's requirement inference costs seconds per model."""
    import timm

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"timm=={timm.__version__}", f"numpy=={np.__version__}"]


@contextlib.contextmanager
def _quiet(*names: str):
    """Hide MLflow's per-model notices (the pickle warning, 'registered model') at INFO/WARNING."""
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def log_student_model(run, distiller, cfg: dict, data, sha: str) -> str:
    """Log and register the deployable student of ``run`` (the active run); return its URI."""
    module = copy.deepcopy(distiller.deployed_model()).cpu().eval()
    x = next(iter(data.loader("test", batch_size=EXAMPLE_IMAGES)))[0]
    example = x.detach().float().cpu().contiguous().numpy()
    with _quiet("mlflow.pytorch", "mlflow.models.model", "mlflow.tracking._model_registry.fluent"):
        info = mlflow.pytorch.log_model(
            module, name=MODEL_NAME, serialization_format="pickle", signature=_signature(example, data.num_classes),
            input_example=example, pip_requirements=_requirements(),
            metadata=model_metadata(cfg, data, sha, run.run_id, list(example.shape[1:])),
            registered_model_name=registered_name(cfg))
    run.set_tags({MODEL_TAG: info.model_uri, "asib.registered_model":
                  f"models:/{registered_name(cfg)}/{info.registered_model_version}"})
    return info.model_uri


def is_model_uri(target: str) -> bool:
    """``runs:/...``, ``models:/...`` or any other URI (a run id has no ``:/``)."""
    return ":/" in target


def model_source(uri: str) -> str:
    """The id of the run that logged the MLflow model at ``uri``."""
    from mlflow.models import Model

    from asib_core.errors import MissingArtifactError

    try:
        info = Model.load(uri)
    except Exception as exc:  # noqa: BLE001 - any failure means: no model there
        raise MissingArtifactError(
            f"no MLflow model at '{uri}' ({str(exc).splitlines()[0][:200]}); pass a run id, runs:/<run id>/model "
            "or models:/<registered name>/<version> of a distill run (listed in `mlflow ui`, Models).") from None
    if not info.run_id:
        raise MissingArtifactError(f"the MLflow model at '{uri}' names no run that logged it; evaluate takes a "
                                   "student logged by a distill run of this project.")
    return info.run_id


def load_student_model(uri: str, device: torch.device) -> torch.nn.Module:
    return mlflow.pytorch.load_model(uri, map_location=device).to(device).eval()
