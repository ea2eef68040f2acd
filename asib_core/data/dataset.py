"""In-memory image dataset container, dataset errors and pixel statistics.

Every reader in this package returns an :class:`ArrayDataset`: all images of one split as a
single ``uint8`` array in HWC layout plus ``int64`` labels. Nothing is decoded lazily; the
batch iterator in :mod:`asib_core.data.batches` moves the whole array to the training device
once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

Stats = tuple[float, float, float]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the configuration says they are.

    The message is one paragraph naming the dataset, every path that was tried and how to
    obtain the data.
    """

    def __init__(self, dataset: str, tried: Iterable[Path | str], how_to_get: str):
        self.dataset = dataset
        self.tried = [str(p) for p in tried]
        self.how_to_get = how_to_get
        paths = ", ".join(f"'{p}'" for p in self.tried) or "(no path)"
        message = (
            f"Dataset '{dataset}' was not found. Paths tried: {paths}. {how_to_get} "
            "The data root comes from `dataset.root` in the config (default ./data); when it "
            "is left at ./data the environment variable ASIB_DATA_ROOT replaces it."
        )
        super().__init__(message)

    def __reduce__(self):  # keep the structured fields when pickled (e.g. across processes)
        return (type(self), (self.dataset, self.tried, self.how_to_get))


class DataError(ValueError):
    """The data exist but cannot train as given: a file that does not decode, class folders that
    differ between the splits, fewer than two classes, a split too small for one batch.

    The message is one paragraph naming the file or the numbers, and the fix.
    """


@dataclass
class ArrayDataset:
    """One split of an image classification dataset held fully in memory.

    Attributes:
        images: ``uint8`` array ``[N, H, W, 3]`` (HWC, RGB); 32x32 for every built-in reader.
        labels: ``int64`` array ``[N]`` with values in ``[0, num_classes)``.
        num_classes: size of the label space (unchanged by class filtering).
        class_names: ``num_classes`` human-readable names, index = label.
        name: registry name of the dataset (``cifar100``, ``imagefolder`` ...).
        mean, std: per-channel normalisation constants for pixels scaled to ``[0, 1]``.
        split: ``train``/``test`` (or ``val``/``train`` after a held-out split), informative.
        source: where the data was read from, informative.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: list[str]
    name: str
    mean: Stats
    std: Stats
    split: str = ""
    source: str = ""
    meta: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.labels = np.asarray(self.labels).astype(np.int64, copy=False).reshape(-1)
        if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: images must be uint8 [N,H,W,3], got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.name}: {len(self.images)} images but {len(self.labels)} labels"
            )
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes"
            )
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean/std must be 3 values, std > 0")

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | np.ndarray, split: str | None = None) -> "ArrayDataset":
        """A new dataset with the samples at ``indices`` (copied), same label space."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            class_names=list(self.class_names),
            split=self.split if split is None else split,
            meta=dict(self.meta),
        )

    def class_counts(self) -> np.ndarray:
        """Number of samples per class, length ``num_classes``."""
        return np.bincount(self.labels, minlength=self.num_classes)


def channel_stats(images: np.ndarray) -> tuple[Stats, Stats]:
    """Exact per-channel mean and (population) std of ``uint8`` HWC images scaled to [0, 1].

    Uses a 256-bin histogram per channel, so it needs no float copy of the array.
    """
    if images.dtype != np.uint8 or images.shape[-1] != 3:
        raise ValueError("channel_stats expects uint8 [..., 3] images")
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    flat = images.reshape(-1, 3)
    for c in range(3):
        hist = np.bincount(np.ascontiguousarray(flat[:, c]), minlength=256).astype(np.float64)
        total = hist.sum()
        if total == 0:
            raise ValueError("channel_stats of an empty image array")
        mean = float((hist * values).sum() / total)
        var = float((hist * (values - mean) ** 2).sum() / total)
        means.append(mean)
        stds.append(max(var, 0.0) ** 0.5)
    return tuple(means), tuple(stds)  # type: ignore[return-value]
