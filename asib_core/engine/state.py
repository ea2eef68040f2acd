"""Resumable training state: one folder per run, one writer, checkpoints that are verified.

* :func:`atomic_save` writes ``<name>.tmp<pid>``, fsyncs it and renames it over ``<name>``: a
  reader never sees half a file. Temporary files of writers that died are removed.
* :class:`StateFolder` is a run's state folder held by one process: an exclusive ``flock`` on
  ``<folder>/.lock`` (the kernel releases it when the holder dies, even by SIGKILL). A second
  process is refused with :class:`~asib_core.errors.StateInUse`; the holder clears leftovers.
* Checkpoints rotate: saving ``last.pt`` first renames the previous one to ``prev.pt``.
  :func:`read_checkpoint` verifies a file before loading it (empty, not a complete zip archive,
  or a CRC-32 mismatch in any record of torch's zip format = corrupt) and loads it with
  ``weights_only=True``; :meth:`StateFolder.latest_checkpoint` returns the newest readable one
  and moves an unreadable file aside as ``<name>.corrupt``, reporting it in one sentence.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import random
import shutil
import time
import zipfile
from pathlib import Path

import torch

from asib_core.errors import StateInUse
from asib_core.faults import fault_point

log = logging.getLogger(__name__)

LAST = "last.pt"
PREV = "prev.pt"
LOCK = ".lock"
HOLDER_WAIT_S = 15.0   # a dead holder's forked children (data-loader workers) may keep the lock that long


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (the message says why)."""


def _tmp_name(path: Path, pid: int) -> Path:
    return path.with_name(f"{path.name}.tmp{pid}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_dead_tmp(path: Path) -> None:
    """Remove ``<name>.tmp<pid>`` siblings of ``path`` whose writer process is gone."""
    for tmp in path.parent.glob(f"{path.name}.tmp*"):
        suffix = tmp.name[len(path.name) + 4:]
        if suffix.isdigit() and int(suffix) != os.getpid() and not pid_alive(int(suffix)):
            with contextlib.suppress(OSError):
                tmp.unlink()


def atomic_save(obj, path: str | Path, *, keep_previous: Path | None = None) -> None:
    """``torch.save`` to a temporary name, fsync, rename over ``path`` (``keep_previous``: the
    file ``path`` replaces is first renamed there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_tmp(path)
    tmp = _tmp_name(path, os.getpid())
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        fault_point("checkpoint.write")
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_state(path: str | Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def verify_checkpoint(path: str | Path) -> None:
    """Raise :class:`CorruptCheckpoint` unless ``path`` is a complete torch zip archive whose
    records all match their CRC-32 (torch writes them; ``torch.load`` does not check them)."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CorruptCheckpoint("the file is empty")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CorruptCheckpoint(f"it is not a complete checkpoint archive ({size} bytes: {exc})") from None
    if bad is not None:
        raise CorruptCheckpoint(f"the record {bad!r} fails its CRC-32 check")


def read_checkpoint(path: str | Path) -> dict:
    """Verified load (``weights_only=True``); :class:`CorruptCheckpoint` when it cannot be trusted."""
    verify_checkpoint(path)
    try:
        payload = load_state(path)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CorruptCheckpoint(f"torch.load failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict):
        raise CorruptCheckpoint(f"it holds a {type(payload).__name__}, not a training-state dict")
    return payload


class StateFolder:
    """The state folder of one run, held by this process (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def prev(self) -> Path:
        return self.path / PREV

    @property
    def key(self) -> str:
        """What runs of this folder carry as the tag ``asib.state_dir``."""
        return str(self.path.resolve())

    # -- one writer -------------------------------------------------------------
    def claim(self) -> StateFolder:
        """Take the folder's lock (refuse if a live process holds it) and clear leftovers."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self.remove_leftovers()
        return self

    def _lock(self, fd: int) -> None:
        deadline = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                holder = _read_pid(fd)
                if holder is not None and pid_alive(holder):
                    raise StateInUse(
                        f"the run state folder {self.path} is in use by process {holder}, which is running "
                        "this same step with the same configuration; two processes never share one run's "
                        "state: wait for that one to finish, or give this command its own checkpoint_dir=..."
                    ) from None
                # the holder died; its forked children (data-loader workers) exit shortly
                deadline = deadline or time.monotonic() + HOLDER_WAIT_S
                if time.monotonic() > deadline:
                    raise StateInUse(
                        f"the run state folder {self.path} stays locked although its process "
                        f"{holder} is gone (a child of it still runs?); end that process and run "
                        "the command again") from None
                time.sleep(0.5)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)   # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateFolder:
        return self if self._fd is not None else self.claim()

    def __exit__(self, *exc) -> None:
        self.release()

    def remove_leftovers(self) -> None:
        """Temporary files of writers that were killed (only the lock holder may call this)."""
        for tmp in self.path.glob("*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def clear(self) -> None:
        """Remove the folder's content (not the lock this process holds)."""
        for item in self.path.iterdir():
            if item.name == LOCK:
                continue
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    item.unlink()

    # -- checkpoints -------------------------------------------------------------
    def has_checkpoint_files(self) -> bool:
        return self.last.exists() or self.prev.exists()

    def latest_checkpoint(self) -> tuple[dict | None, Path | None, list[str]]:
        """(payload, file, problems): the newest readable of ``last.pt`` and ``prev.pt``; every
        unreadable one is moved aside as ``<name>.corrupt`` and described in ``problems``."""
        problems = []
        for path in (self.last, self.prev):
            if not path.exists():
                continue
            try:
                return read_checkpoint(path), path, problems
            except CorruptCheckpoint as exc:
                problems.append(f"{path} is corrupt: {exc}")
                with contextlib.suppress(OSError):
                    os.replace(path, path.with_name(path.name + ".corrupt"))
        return None, None, problems


def save_checkpoint(payload: dict, state_dir: str | Path) -> None:
    """``last.pt`` atomically; the one it replaces becomes ``prev.pt`` (the fallback when
    ``last.pt`` turns out unreadable)."""
    atomic_save(payload, Path(state_dir) / LAST, keep_previous=Path(state_dir) / PREV)


def latest_checkpoint_in(state_dir: str | Path) -> tuple[dict | None, Path | None]:
    """The newest readable checkpoint of a folder (read-only: nothing moved; for restoring)."""
    for path in (Path(state_dir) / LAST, Path(state_dir) / PREV):
        if path.exists():
            try:
                return read_checkpoint(path), path
            except CorruptCheckpoint as exc:
                log.warning("%s is unreadable (%s); trying the previous checkpoint", path, exc)
    return None, None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, _, gauss = random.getstate()
    random.setstate((version, tuple(state["python"]), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
