"""Reader for Downsampled ImageNet 32x32 (Chrabaszcz, Loshchilov and Hutter, 2017).

The official "pickled batches" release (https://image-net.org/download-images.php, section
"Download downsampled image data (32x32, 64x64)", files ``Imagenet32_train.zip`` and
``Imagenet32_val.zip``) unpacks to ``train_data_batch_1 .. train_data_batch_10`` and
``val_data``. Each file is a pickle dict with

* ``data``: ``uint8 [N, 3072]``, each row the R, G and B 32x32 planes one after the other;
* ``labels``: class ids **1..1000** (shifted to 0..999 here);
* (train batches also carry ``mean``, unused).

``val_data`` is the split we call ``test`` (the official test labels are not public). Files
are searched in ``<root>``, ``<root>/imagenet32``, and (as unzipped) ``<root>/Imagenet32_train``
/ ``<root>/Imagenet32_val``. If a ``map_clsloc.txt`` (ImageNet devkit: ``wnid id name`` per
line, ids 1..1000) sits next to the batches, its names become ``class_names``; otherwise the
names are ``"0" .. "999"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cache import cached_arrays, source_fingerprint
from .cifar import chw_rows_to_hwc, load_pickle
from .dataset import ArrayDataset, DatasetNotFoundError

NAME = "imagenet32"
NUM_CLASSES = 1000
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
TRAIN_FILES = tuple(f"train_data_batch_{i}" for i in range(1, 11))
TEST_FILES = ("val_data",)
DOWNLOAD_HINT = (
    "ImageNet-32 cannot be downloaded automatically (it needs an ImageNet account): download "
    "the official 'Downsampled ImageNet 32x32' pickled batches (Imagenet32_train.zip and "
    "Imagenet32_val.zip) from https://image-net.org/download-images.php and unzip them so that "
    "the data root (or its 'imagenet32' subfolder) holds train_data_batch_1 .. "
    "train_data_batch_10 and val_data."
)


def _candidate_dirs(root: Path, split: str) -> list[Path]:
    unzipped = root / ("Imagenet32_train" if split == "train" else "Imagenet32_val")
    return [root, root / "imagenet32", unzipped, root / "imagenet32" / unzipped.name]


def _split_files(split: str) -> tuple[str, ...]:
    return TRAIN_FILES if split == "train" else TEST_FILES


def _find_dir(root: Path, split: str) -> Path | None:
    for d in _candidate_dirs(root, split):
        if all((d / f).is_file() for f in _split_files(split)):
            return d
    return None


def _class_names(directory: Path, root: Path) -> list[str]:
    for d in (directory, root, root / "imagenet32"):
        mapping = d / "map_clsloc.txt"
        if mapping.is_file():
            names = [""] * NUM_CLASSES
            for line in mapping.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3 and parts[1].isdigit() and 1 <= int(parts[1]) <= NUM_CLASSES:
                    names[int(parts[1]) - 1] = parts[2]
            if all(names):
                return names
    return [str(i) for i in range(NUM_CLASSES)]


def _decode(directory: Path, split: str) -> dict[str, np.ndarray]:
    images, labels = [], []
    for fname in _split_files(split):
        batch = load_pickle(directory / fname)
        images.append(chw_rows_to_hwc(batch["data"]))
        lab = np.asarray(batch["labels"], dtype=np.int64).reshape(-1) - 1
        if lab.size and (lab.min() < 0 or lab.max() >= NUM_CLASSES):
            raise ValueError(
                f"{directory / fname}: labels must be 1-based in [1, {NUM_CLASSES}] as in the "
                f"official release, found [{lab.min() + 1}, {lab.max() + 1}]"
            )
        labels.append(lab)
    return {"images": np.concatenate(images), "labels": np.concatenate(labels)}


def load_imagenet32(root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Read one split of ImageNet-32 (``test`` = the official ``val_data``)."""
    root = Path(root)
    directory = _find_dir(root, split)
    if directory is None:
        tried = [d / f for d in _candidate_dirs(root, split)[:2] for f in _split_files(split)[:1]]
        hint = DOWNLOAD_HINT
        if download:
            hint = "`dataset.download=true` does not apply here. " + hint
        raise DatasetNotFoundError(NAME, tried, hint)
    files = [directory / f for f in _split_files(split)]
    key = source_fingerprint(directory, files)
    arrays = cached_arrays(root, NAME, split, key, lambda: _decode(directory, split))
    return ArrayDataset(
        images=arrays["images"],
        labels=arrays["labels"],
        num_classes=NUM_CLASSES,
        class_names=_class_names(directory, root),
        name=NAME,
        mean=MEAN,
        std=STD,
        split=split,
        source=str(directory),
    )
