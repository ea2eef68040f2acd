"""Decode-once cache for decoded dataset splits.

A decoded split (``uint8`` images, ``int64`` labels and a few small metadata arrays) is saved
as an uncompressed ``.npz`` file named ``<dataset>_<split>_<key>.npz``. The key is the first 16
hex digits of a SHA-256 over a description of the source files: the resolved source
directory, and for every source file its path relative to that directory, its size in bytes
and its modification time in nanoseconds (see :func:`source_fingerprint`). Touching,
replacing, adding or removing a source file therefore changes the key and forces a fresh
decode; the stale file is simply left behind.

Where the cache lives, in order:

1. ``<data root>/.asib_cache/`` next to the data;
2. when that directory cannot be created or written (a read-only data directory such as
   ``../shared``), ``$ASIB_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/asib-kd`` or
   ``~/.cache/asib-kd``.

Lookups check both places. Files are written to a temporary name and renamed, so concurrent
processes (for example DDP ranks) never read a half-written cache. Setting
``ASIB_DATA_CACHE=0`` disables the cache (every load decodes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
CACHE_SUBDIR = ".asib_cache"


def cache_enabled() -> bool:
    """False when ``ASIB_DATA_CACHE`` is set to 0/false/no/off."""
    return os.environ.get("ASIB_DATA_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def fallback_cache_dir() -> Path:
    """``$ASIB_CACHE_DIR``, else ``$XDG_CACHE_HOME/asib-kd``, else ``~/.cache/asib-kd``."""
    explicit = os.environ.get("ASIB_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "asib-kd"


def cache_dirs(data_root: Path) -> list[Path]:
    """Candidate cache directories, preferred first."""
    return [Path(data_root) / CACHE_SUBDIR, fallback_cache_dir()]


def source_fingerprint(base: Path, files: Iterable[Path], extra: dict | None = None) -> str:
    """16-hex-digit key over ``(relative path, size, mtime_ns)`` of each file below ``base``.

    ``files`` are expected to be paths built from ``base`` (their relative part is the text
    after ``base``); other paths enter with their full text. ``extra`` (JSON-serialisable) is
    mixed in, e.g. decoding options that change the output.
    """
    prefix = os.path.join(str(base), "")
    entries = []
    for f in files:
        text = str(f)
        st = os.stat(text)
        rel = text[len(prefix):] if text.startswith(prefix) else text
        entries.append((rel, st.st_size, st.st_mtime_ns))
    entries.sort()
    payload = json.dumps(
        {
            "v": CACHE_FORMAT_VERSION,
            "base": str(Path(base).resolve()),
            "files": entries,
            "extra": extra or {},
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def cache_filename(dataset: str, split: str, key: str) -> str:
    return f"{dataset}_{split}_{key}.npz"


def find_cached(data_root: Path, filename: str) -> Path | None:
    """The first existing cache file of that name, or None."""
    for d in cache_dirs(data_root):
        p = d / filename
        if p.is_file():
            return p
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write_npz(directory: Path, filename: str, arrays: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **arrays)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; use the usual file mode
        final = directory / filename
        os.replace(tmp, final)
        return final
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def store(data_root: Path, filename: str, arrays: dict[str, np.ndarray]) -> Path | None:
    """Write ``arrays`` to the first writable cache directory; None if none is writable."""
    errors = []
    for d in cache_dirs(data_root):
        try:
            return _write_npz(d, filename, arrays)
        except OSError as exc:  # read-only, not a directory, disk full ...
            errors.append(f"{d}: {exc}")
    log.warning("could not write dataset cache %s (%s)", filename, "; ".join(errors))
    return None


def cached_arrays(
    data_root: Path,
    dataset: str,
    split: str,
    key: str,
    decode: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Return the cached arrays for ``(dataset, split, key)``, decoding and storing on a miss.

    A cache file that cannot be read (truncated, corrupt) is ignored and rewritten.
    """
    if not cache_enabled():
        return decode()
    filename = cache_filename(dataset, split, key)
    hit = find_cached(data_root, filename)
    if hit is not None:
        try:
            return _read_npz(hit)
        except Exception as exc:  # corrupt or truncated file: decode again
            log.warning("ignoring unreadable dataset cache %s: %s", hit, exc)
    arrays = decode()
    store(data_root, filename, arrays)
    return arrays
