"""Where the project's shared material lives, without a path of one machine.

The shared folder (real CIFAR-10 JPEGs, the method documents) sits next to the project
checkout as ``../shared``; ``$ASIB_SHARED_DIR`` points elsewhere. The CIFAR-10 JPEG tarball
can also be named directly with ``$ASIB_CIFAR10_JPEG_TAR``."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CIFAR10_JPEG_NAME = "data/cifar10-jpeg.tar.gz"


def shared_dir() -> Path:
    """``$ASIB_SHARED_DIR``, else ``<project root>/../shared``."""
    return Path(os.environ.get("ASIB_SHARED_DIR") or PROJECT_ROOT.parent / "shared")


def cifar10_jpeg_tarball() -> Path:
    """The real CIFAR-10 JPEG set: ``$ASIB_CIFAR10_JPEG_TAR``, else in the shared folder."""
    return Path(os.environ.get("ASIB_CIFAR10_JPEG_TAR") or shared_dir() / CIFAR10_JPEG_NAME)
