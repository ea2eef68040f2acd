"""Saving and loading model weights (plain state dicts, safe to load)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn


def save_state(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model.state_dict()`` to ``path`` atomically (temporary file, then rename).

    A reader never sees a half-written file: the data go to a temporary file in the same
    folder, which then replaces ``path`` in one ``os.replace``. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    return path


def load_state(model: nn.Module, path: str | os.PathLike, strict: bool = True):
    """Load a state dict saved by :func:`save_state` into ``model`` (CPU, weights only).

    Returns torch's ``(missing_keys, unexpected_keys)`` result (both empty when strict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return model.load_state_dict(state, strict=strict)
