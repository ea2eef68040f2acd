"""The user errors every entry point reports as one paragraph and exit code 2."""
from __future__ import annotations

from asib_core.config.errors import ConfigError, ConfigLockError


class MissingArtifactError(FileNotFoundError):
    """A dataset, checkpoint or run the command needs does not exist (message says how to get it)."""


class StateInUse(RuntimeError):
    """Another live process holds the run state folder this command would write (one writer per run)."""


class TrackingUnavailable(ConnectionError):
    """The MLflow tracking server named by MLFLOW_TRACKING_URI does not answer."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Imported on demand so that light commands (config printing) do not import torch."""
    from asib_core.data import DatasetNotFoundError
    from asib_core.models import PretrainedWeightsUnavailable

    return (ConfigError, ConfigLockError, MissingArtifactError, DatasetNotFoundError,
            PretrainedWeightsUnavailable, StateInUse, TrackingUnavailable)
