"""Where runs go: MLflow 3.x defaults (``sqlite:///mlflow.db`` in the project root,
artifacts under ``./mlruns``) unless ``MLFLOW_TRACKING_URI`` says otherwise."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow

from asib_core.errors import check_writable_store

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"


def configure_tracking(workdir: str | Path | None = None) -> str:
    """Set the tracking URI (env wins) and return it."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        root = Path(workdir or os.getcwd()).resolve()
        uri = f"sqlite:///{root / DEFAULT_DB}"
        os.environ["MLFLOW_TRACKING_URI"] = uri
    check_writable_store(uri)  # a read-only store is refused before any run is created (#14)
    mlflow.set_tracking_uri(uri)
    return uri


def artifact_root(workdir: str | Path | None = None) -> str | None:
    """Artifact location for new experiments on a local store (None for a server)."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    root = Path(os.environ.get("ASIB_ARTIFACT_ROOT") or Path(workdir or os.getcwd()) / DEFAULT_ARTIFACTS)
    return root.resolve().as_uri()
