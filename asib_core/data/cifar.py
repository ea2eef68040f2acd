"""Readers for the official CIFAR-10 / CIFAR-100 "python version" pickles.

Layout (the one torchvision's ``CIFAR10``/``CIFAR100`` download and extract):

* CIFAR-10:  ``<root>/cifar-10-batches-py/data_batch_1 .. data_batch_5``, ``test_batch``,
  ``batches.meta`` (``label_names``); each batch is a pickle dict with ``data`` (``uint8``
  ``[N, 3072]``, each row the R, G and B 32x32 planes one after the other) and ``labels``.
* CIFAR-100: ``<root>/cifar-100-python/train``, ``test`` (``data``, ``fine_labels``) and
  ``meta`` (``fine_label_names``).

``root`` may also point directly at the ``cifar-10-batches-py`` / ``cifar-100-python``
folder. Pickles are read with ``encoding='latin1'``, as torchvision does. They are trusted
input: never point a reader at pickles from an unknown source.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache import cached_arrays, source_fingerprint
from .dataset import ArrayDataset, DatasetNotFoundError


@dataclass(frozen=True)
class CifarFormat:
    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    torchvision_class: str
    archive: str


CIFAR10 = CifarFormat(
    name="cifar10",
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    torchvision_class="CIFAR10",
    archive="cifar-10-python.tar.gz",
)

CIFAR100 = CifarFormat(
    name="cifar100",
    folder="cifar-100-python",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    mean=(0.5071, 0.4867, 0.4408),
    std=(0.2675, 0.2565, 0.2761),
    torchvision_class="CIFAR100",
    archive="cifar-100-python.tar.gz",
)


def load_pickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")


def chw_rows_to_hwc(data: np.ndarray) -> np.ndarray:
    """``uint8 [N, 3072]`` rows (R, G, B planes of 32x32) -> ``uint8 [N, 32, 32, 3]``."""
    arr = np.asarray(data, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape[1] != 3 * 32 * 32:
        raise ValueError(f"expected rows of 3072 bytes, got shape {arr.shape}")
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def _candidate_dirs(fmt: CifarFormat, root: Path) -> list[Path]:
    return [root / fmt.folder, root]


def _find_dir(fmt: CifarFormat, root: Path, split: str) -> Path | None:
    files = (fmt.train_files if split == "train" else fmt.test_files) + (fmt.meta_file,)
    for d in _candidate_dirs(fmt, root):
        if all((d / f).is_file() for f in files):
            return d
    return None


def _not_found(fmt: CifarFormat, root: Path, split: str) -> DatasetNotFoundError:
    files = (fmt.train_files if split == "train" else fmt.test_files) + (fmt.meta_file,)
    tried = [d / f for d in _candidate_dirs(fmt, root)[:1] for f in files]
    how = (
        f"Set `dataset.download=true` on a machine with internet access (torchvision's "
        f"{fmt.torchvision_class} downloader fetches and extracts the official archive into the "
        f"data root), or place the official CIFAR python-version archive "
        f"({fmt.archive}) "
        f"extracted so that '{root / fmt.folder}' holds {', '.join(files)}."
    )
    return DatasetNotFoundError(fmt.name, tried, how)


def _download(fmt: CifarFormat, root: Path) -> None:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)
    getattr(tvd, fmt.torchvision_class)(str(root), train=True, download=True)


def _decode(fmt: CifarFormat, directory: Path, split: str) -> dict[str, np.ndarray]:
    images, labels = [], []
    for fname in fmt.train_files if split == "train" else fmt.test_files:
        batch = load_pickle(directory / fname)
        images.append(chw_rows_to_hwc(batch["data"]))
        labels.append(np.asarray(batch[fmt.label_key], dtype=np.int64))
    names = [str(n) for n in load_pickle(directory / fmt.meta_file)[fmt.names_key]]
    return {
        "images": np.concatenate(images),
        "labels": np.concatenate(labels),
        "class_names": np.asarray(names, dtype=str),
    }


def load_cifar(fmt: CifarFormat, root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Read one split of CIFAR-10/100 from ``root`` (cached after the first decode)."""
    root = Path(root)
    directory = _find_dir(fmt, root, split)
    if directory is None and download:
        _download(fmt, root)
        directory = _find_dir(fmt, root, split)
    if directory is None:
        raise _not_found(fmt, root, split)
    files = (fmt.train_files if split == "train" else fmt.test_files) + (fmt.meta_file,)
    key = source_fingerprint(directory, [directory / f for f in files])
    arrays = cached_arrays(root, fmt.name, split, key, lambda: _decode(fmt, directory, split))
    class_names = [str(n) for n in arrays["class_names"]]
    if len(class_names) != fmt.num_classes:
        raise ValueError(
            f"{fmt.name}: {directory / fmt.meta_file} lists {len(class_names)} classes, "
            f"expected {fmt.num_classes}"
        )
    return ArrayDataset(
        images=arrays["images"],
        labels=arrays["labels"],
        num_classes=fmt.num_classes,
        class_names=class_names,
        name=fmt.name,
        mean=fmt.mean,
        std=fmt.std,
        split=split,
        source=str(directory),
    )


def load_cifar10(root: Path, split: str, download: bool = False) -> ArrayDataset:
    return load_cifar(CIFAR10, root, split, download)


def load_cifar100(root: Path, split: str, download: bool = False) -> ArrayDataset:
    return load_cifar(CIFAR100, root, split, download)
