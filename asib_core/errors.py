"""The user errors every entry point reports as one paragraph and exit code 2."""
from __future__ import annotations

import os
from pathlib import Path

from asib_core.config.errors import ConfigError, ConfigLockError


class MissingArtifactError(FileNotFoundError):
    """A dataset, checkpoint or run the command needs does not exist (message says how to get it)."""


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot serve: it does not load (truncated, corrupt, not a
    PyTorch file) or holds something else than expected (another kind of payload, another model,
    another class count). The message names the file, what was expected and what was found."""


class UnwritableError(PermissionError):
    """A folder or tracking store the command must write to cannot be written (read-only, or a
    file stands where a folder is needed). Checked before a run is created."""


def check_writable_dir(path: str | os.PathLike, what: str) -> None:
    """Refuse (:class:`UnwritableError`) a folder that cannot be created or written; nothing is
    created here (the first existing ancestor is probed)."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UnwritableError(f"{what} {path} cannot be created: {probe} is a file, not a folder. "
                              "Move the file or point the setting at another folder.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UnwritableError(f"{what} {path} cannot be written: {probe} is read-only. Make it writable "
                              "or point the setting at a writable folder.")


def check_writable_store(uri: str) -> None:
    """Refuse a local tracking store (sqlite file or folder) this process cannot write."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        check_writable_dir(db.parent, f"the folder of the tracking store {uri}:")
        if db.exists() and not os.access(db, os.W_OK):
            raise UnwritableError(f"the tracking store {uri} cannot be written: the database file {db} is "
                                  "read-only. Make it writable, or point MLFLOW_TRACKING_URI at a writable "
                                  "store (e.g. sqlite:///mlflow.db in a folder you own).")
    elif uri.startswith("file://"):
        check_writable_dir(uri[len("file://"):], "the tracking store")
    elif uri.startswith(("/", "./", "../")):  # a plain folder (MLflow's file store)
        check_writable_dir(uri, "the tracking store")


class StateInUse(RuntimeError):
    """Another live process holds the run state folder this command would write (one writer per run)."""


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI does not answer."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Imported on demand so that light commands (config printing) do not import torch."""
    from asib_core.data import DataError, DatasetNotFoundError
    from asib_core.models import PretrainedWeightsUnavailable

    return (ConfigError, ConfigLockError, MissingArtifactError, CheckpointError, UnwritableError,
            DatasetNotFoundError, DataError, PretrainedWeightsUnavailable, StateInUse, TrackingUnavailable)
