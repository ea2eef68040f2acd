"""Dataset registry, data-root resolution and the single entry point :func:`load_split`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .cifar import load_cifar10, load_cifar100
from .dataset import ArrayDataset
from .digits import load_digits32
from .imagefolder import load_imagefolder
from .imagenet32 import load_imagenet32

DEFAULT_ROOT = "./data"
ROOT_ENV_VAR = "ASIB_DATA_ROOT"
SPLITS = ("train", "test")

Loader = Callable[[Path, str, bool], ArrayDataset]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    load: Loader
    description: str


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("cifar10", load_cifar10, "CIFAR-10, official python pickles"),
        DatasetSpec("cifar100", load_cifar100, "CIFAR-100 (fine labels), official python pickles"),
        DatasetSpec("imagenet32", load_imagenet32, "Downsampled ImageNet 32x32, official pickles"),
        DatasetSpec("imagefolder", load_imagefolder, "<root>/{train,test}/<class>/*.jpg|png"),
        DatasetSpec("digits", load_digits32, "scikit-learn digits, 32x32 RGB, built in"),
    )
}


def dataset_names() -> list[str]:
    return sorted(DATASETS)


def get_spec(name: str) -> DatasetSpec:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset '{name}'. Known datasets: {', '.join(dataset_names())}.")
    return DATASETS[key]


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The data root to use.

    ``root`` (``dataset.root`` in the config) wins, except when it is missing or the default
    ``./data`` and the environment variable ``ASIB_DATA_ROOT`` is set: then that variable's
    value is used. ``~`` and ``$VARS`` are expanded.
    """
    raw = DEFAULT_ROOT if root is None or str(root).strip() == "" else str(root)
    env = os.environ.get(ROOT_ENV_VAR, "").strip()
    if env and Path(raw) == Path(DEFAULT_ROOT):
        raw = env
    return Path(os.path.expandvars(os.path.expanduser(raw)))


def load_split(
    name: str, root: str | os.PathLike | None = DEFAULT_ROOT, split: str = "train", download: bool = False
) -> ArrayDataset:
    """Load one split (``train`` or ``test``) of a registered dataset into memory.

    Raises:
        ValueError: unknown dataset name (the message lists the known ones) or split.
        DatasetNotFoundError: the files are missing (the message says where and how to get them).
    """
    spec = get_spec(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
    return spec.load(resolve_root(root), split, bool(download))
