"""Environment variables set for a block of code and restored afterwards.

MLflow and the chained entry points read their settings from the process environment
(``MLFLOW_RUN_ID``, ``MLFLOW_EXPERIMENT_NAME``, ``ASIB_WORKDIR``); a value meant for one block
must not outlive it, or every later command in the same process inherits it."""
from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def scoped_environ(**values: str | None):
    """Set (a string) or unset (``None``) each variable inside the block; restore them after."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        set_environ(values)
        yield
    finally:
        set_environ(saved)


def set_environ(values: dict[str, str | None]) -> None:
    """Set (a string) or unset (``None``) each variable, e.g. to restore a saved snapshot."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
