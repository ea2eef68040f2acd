"""Image archives (the real CIFAR-10 JPEG tarball) unpacked once into the data cache."""
from __future__ import annotations

import logging
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

from asib_core.errors import MissingArtifactError

from .cache import fallback_cache_dir

log = logging.getLogger("asib.data")


def extract_tarball(tarball: Path, dest: Path) -> None:
    """Unpack with the system ``tar`` when present (5x faster than ``tarfile`` here)."""
    dest.mkdir(parents=True, exist_ok=True)
    if shutil.which("tar"):
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(dest)], check=True)
    else:
        with tarfile.open(tarball) as tf:
            tf.extractall(dest, filter="data")


def unpacked_tarball(tarball: Path, name: str) -> Path:
    """``<cache>/<name>/`` holding the unpacked ``tarball``, extracted on first use (a marker file
    says a previous extraction completed; ``<cache>`` is ``$ASIB_CACHE_DIR`` or ``~/.cache/asib-kd``)."""
    dest = fallback_cache_dir() / name
    marker = dest / ".extracted"
    if not marker.is_file():
        if not Path(tarball).is_file():
            raise MissingArtifactError(
                f"the image archive {tarball} does not exist. Put it there, set $ASIB_CIFAR10_JPEG_TAR to "
                "its path, or set $ASIB_DATA_ROOT to an already unpacked folder.")
        start = time.perf_counter()
        extract_tarball(Path(tarball), dest)
        marker.write_text(str(tarball))
        log.info("extracted %s -> %s in %.1f s", tarball, dest, time.perf_counter() - start)
    return dest
