"""Reader for a plain image-folder dataset (e.g. the CIFAR-10 JPEG set in ../shared/data).

Layout::

    <root>/train/<class name>/*.jpg|*.jpeg|*.png
    <root>/test/<class name>/*.jpg|*.jpeg|*.png

* Classes are the sub-folders of ``train``, sorted by name; label = index in that list.
  ``test`` must not have classes that ``train`` lacks (refused, naming them); the reader lets
  ``test`` lack classes, but a run refuses that (``build_data`` checks that every class has
  test images).
* A file that PIL cannot decode (truncated, corrupt, not an image) is refused with a
  :class:`DataError` naming the file.
* Within a class, files are taken in sorted file-name order (extension match is
  case-insensitive), so the sample order is reproducible.
* Each image is decoded with PIL, converted to RGB (grey, palette and RGBA inputs included)
  and, if it is not already 32x32, resized to 32x32 with bilinear filtering (aspect ratio not
  kept).
* ``mean``/``std`` of both splits are the exact per-channel statistics of the decoded
  **training** images (pixels scaled to [0, 1], population std), cached with them.
* Decoded splits are cached (see :mod:`asib_core.data.cache`); the key covers every file's
  relative path, size and mtime.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .cache import cached_arrays, source_fingerprint
from .dataset import ArrayDataset, DataError, DatasetNotFoundError, channel_stats

NAME = "imagefolder"
EXTENSIONS = (".jpg", ".jpeg", ".png")
IMAGE_SIZE = 32
LAYOUT_HINT = (
    "An image-folder dataset needs the layout <root>/train/<class>/*.jpg|jpeg|png and "
    "<root>/test/<class>/*.jpg|jpeg|png (one sub-folder per class, class order = sorted folder "
    "names). For the CIFAR-10 JPEG set, extract ../shared/data/cifar10-jpeg.tar.gz and point "
    "the root at its 'cifar10' folder."
)


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    names = sorted(
        e.name
        for e in os.scandir(class_dir)
        if e.is_file() and os.path.splitext(e.name)[1].lower() in EXTENSIONS
    )
    return [class_dir / n for n in names]


def _list_split(root: Path, split: str, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    split_dir = root / split
    present = _class_dirs(split_dir)
    unknown = sorted(set(present) - set(classes))
    if unknown:
        raise DataError(
            f"imagefolder: {split_dir} has class folders that {root / 'train'} lacks: "
            f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}. Train and test need the "
            "same class folders (a class the model never trains on cannot be predicted); add the "
            "class to train or remove it from test."
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        if cls not in present:
            continue
        found = _image_files(split_dir / cls)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise DatasetNotFoundError(NAME, [split_dir], "No images found there. " + LAYOUT_HINT)
    return files, np.asarray(labels, dtype=np.int64)


def decode_image(path: Path, size: int = IMAGE_SIZE) -> np.ndarray:
    """One image file -> ``uint8 [size, size, 3]`` RGB.

    The file is read into memory first and decoded from a ``BytesIO``: for tiny images this
    is about twice as fast as letting PIL open the path itself.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.mode != "RGB":
                img = img.convert("RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"imagefolder: the image file {path} cannot be decoded ({type(exc).__name__}: {exc}); it is "
            f"truncated, corrupt or not an image ({len(data)} bytes). Replace or delete the file."
        ) from None


def decode_files(files: list[Path], size: int = IMAGE_SIZE) -> np.ndarray:
    """Decode many files into one ``uint8 [N, size, size, 3]`` array.

    Sequential on purpose: on small machines threads made decoding slower, not faster.
    """
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        out[i] = decode_image(f, size)
    return out


def _decode_split(files: list[Path], labels: np.ndarray, with_stats: bool) -> dict[str, np.ndarray]:
    images = decode_files(files)
    arrays = {"images": images, "labels": labels}
    if with_stats:
        mean, std = channel_stats(images)
        arrays["mean"] = np.asarray(mean, dtype=np.float64)
        arrays["std"] = np.asarray(std, dtype=np.float64)
    return arrays


def load_imagefolder(root: Path, split: str, download: bool = False) -> ArrayDataset:
    """Read ``<root>/<split>/<class>/*`` into memory (cached after the first decode)."""
    root = Path(root)
    train_dir, split_dir = root / "train", root / split
    if not train_dir.is_dir() or not split_dir.is_dir():
        missing = [d for d in (train_dir, split_dir) if not d.is_dir()]
        raise DatasetNotFoundError(NAME, missing, LAYOUT_HINT)
    classes = _class_dirs(train_dir)
    if not classes:
        raise DatasetNotFoundError(NAME, [train_dir], "It has no class sub-folders. " + LAYOUT_HINT)

    train_files, train_labels = _list_split(root, "train", classes)
    train_key = source_fingerprint(root, train_files, {"size": IMAGE_SIZE, "classes": classes})
    if split == "train":
        arrays = cached_arrays(
            root, NAME, "train", train_key, lambda: _decode_split(train_files, train_labels, True)
        )
        mean, std = arrays["mean"], arrays["std"]
        # Also keep the statistics alone, so a later test-split load needs no train decode.
        cached_arrays(root, NAME, "train-stats", train_key, lambda: {"mean": mean, "std": std})
    else:
        files, labels = _list_split(root, split, classes)
        key = source_fingerprint(root, files, {"size": IMAGE_SIZE, "classes": classes})
        arrays = cached_arrays(root, NAME, split, key, lambda: _decode_split(files, labels, False))
        stats = cached_arrays(root, NAME, "train-stats", train_key, lambda: _train_stats(root))
        mean, std = stats["mean"], stats["std"]
    return ArrayDataset(
        images=arrays["images"],
        labels=arrays["labels"],
        num_classes=len(classes),
        class_names=list(classes),
        name=NAME,
        mean=tuple(mean),
        std=tuple(std),
        split=split,
        source=str(root),
    )


def _train_stats(root: Path) -> dict[str, np.ndarray]:
    train = load_imagefolder(root, "train")
    return {"mean": np.asarray(train.mean), "std": np.asarray(train.std)}
