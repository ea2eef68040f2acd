"""Saving and loading model weights (plain state dicts, safe to load), and reading any
checkpoint file with a clear error when it does not load or does not fit a model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asib_core.errors import CheckpointError, MissingArtifactError


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
    state = read_checkpoint(path, "model checkpoint")
    if not is_state_dict(state):
        raise CheckpointError(f"model checkpoint {path}: expected a state dict (names -> tensors), "
                              f"found {describe_payload(state)}.")
    check_shapes(model, state, f"model checkpoint {path}")
    return model.load_state_dict(state, strict=strict)


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a missing file is a
    :class:`MissingArtifactError`, a file that does not load (empty, truncated, corrupt, not a
    PyTorch file, or holding objects other than tensors and plain containers) a
    :class:`CheckpointError` naming the file. ``mmap=True`` maps the tensors instead of reading
    them (files of the current torch.save format; other files are read normally)."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtifactError(f"{what} not found: {path}")
    if mmap:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - not mappable: the plain load below says what is wrong
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, UnpicklingError, KeyError...
        detail = " ".join(str(exc).split()).split(". ")[0][:160] or "no detail"
        raise CheckpointError(
            f"{what} {path} cannot be loaded ({path.stat().st_size} bytes; {type(exc).__name__}: {detail}). "
            "It is empty, truncated or corrupt, or not a file written by torch.save with tensors only. "
            "Write it again (re-run the step that produced it) or point the config at another file."
        ) from None


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def describe_payload(obj: Any) -> str:
    """A short description of what a checkpoint holds (for error messages)."""
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if is_state_dict(obj):
        keys = list(obj)
        return f"a bare state dict of {len(keys)} tensors ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:8]]
        return f"a dict with the keys {', '.join(keys) or '(none)'}{' ...' if len(obj) > 8 else ''}"
    return f"a {type(obj).__name__}"


def check_shapes(model: nn.Module, state: dict, what: str, ignore: tuple[str, ...] = (), fix: str = "") -> None:
    """Refuse a state dict whose tensors do not have the model's shapes (e.g. another class
    count), naming the first differences, before ``load_state_dict`` fails with a traceback."""
    own = model.state_dict()
    diffs = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and not k.startswith(ignore) and own[k].shape != v.shape]
    if diffs:
        raise CheckpointError(f"{what} does not fit the model: {len(diffs)} tensors differ in shape "
                              f"({'; '.join(diffs[:3])}).{' ' + fix if fix else ''}")
