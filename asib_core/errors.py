"""The user errors every entry point reports as one paragraph and exit code 2."""
from __future__ import annotations

from asib_core.config.errors import ConfigError, ConfigLockError


class MissingArtifactError(FileNotFoundError):
    """A dataset, checkpoint or run the command needs does not exist (message says how to get it)."""


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot serve: it does not load (truncated, corrupt, not a
    PyTorch file) or holds something else than expected (another kind of payload, another model,
    another class count). The message names the file, what was expected and what was found."""


def user_error_types() -> tuple[type[BaseException], ...]:
    """Imported on demand so that light commands (config printing) do not import torch."""
    from asib_core.data import DataError, DatasetNotFoundError
    from asib_core.models import PretrainedWeightsUnavailable

    return (ConfigError, ConfigLockError, MissingArtifactError, CheckpointError, DatasetNotFoundError, DataError,
            PretrainedWeightsUnavailable)
