"""The user errors every entry point reports as one paragraph and exit code 2."""
from __future__ import annotations

from asib_core.config.errors import ConfigError, ConfigLockError


class MissingArtifactError(FileNotFoundError):
    """A dataset, checkpoint or run the command needs does not exist (message says how to get it)."""


def _collect() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConfigError, ConfigLockError, MissingArtifactError]
    try:
        from asib_core.data import DatasetNotFoundError
        errors.append(DatasetNotFoundError)
    except ImportError:  # data package not importable: still report config errors
        pass
    try:
        from asib_core.models import PretrainedWeightsUnavailable
        errors.append(PretrainedWeightsUnavailable)
    except ImportError:
        pass
    return tuple(errors)


USER_ERRORS = _collect()
