"""scikit-learn's handwritten digits as a 32x32 RGB dataset (no download needed).

``sklearn.datasets.load_digits()`` ships 1,797 real 8x8 grey images (values 0..16) of the
digits 0-9 inside the scikit-learn wheel. Conversion:

1. scale to 0..255 (``value * 255 / 16``);
2. resize 8x8 -> 32x32 with bilinear interpolation (``torch.nn.functional.interpolate``,
   ``align_corners=False``), round to ``uint8``;
3. replicate the grey channel to 3 channels.

Split: a fixed stratified 80/20 train/test split (``sklearn.model_selection.train_test_split``
with ``test_size=0.2``, ``random_state=0``), each part in original sample order; 1,437 train
and 360 test images. ``mean``/``std`` are the statistics of the train part. The split is
decoded on every load (milliseconds), so no cache file is written.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from .dataset import ArrayDataset, channel_stats

NAME = "digits"
SPLIT_SEED = 0
TEST_FRACTION = 0.2


@lru_cache(maxsize=1)
def _decoded() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    grey = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0))
    big = F.interpolate(grey[:, None], size=(32, 32), mode="bilinear", align_corners=False)
    big = big[:, 0].round().clamp_(0, 255).to(torch.uint8).numpy()
    images = np.repeat(big[..., None], 3, axis=-1)
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def load_digits32(root: Path | None = None, split: str = "train", download: bool = False) -> ArrayDataset:
    """The digits split (``root`` and ``download`` are accepted and ignored)."""
    images, labels, train_idx, test_idx = _decoded()
    mean, std = channel_stats(images[train_idx])
    idx = train_idx if split == "train" else test_idx
    return ArrayDataset(
        images=images[idx],
        labels=labels[idx],
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        name=NAME,
        mean=mean,
        std=std,
        split=split,
        source="sklearn.datasets.load_digits",
    )
