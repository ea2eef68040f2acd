"""The image-folder reader on the real CIFAR-10 JPEG set (skips when the tarball is absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ for fixtures_data
from fixtures_data import CIFAR10_CLASSES, cifar10_jpeg_root  # noqa: E402,F401

import asib_core.data as D  # noqa: E402
from asib_core.data import imagefolder  # noqa: E402

OFFICIAL_MEAN = (0.4914, 0.4822, 0.4465)


def test_real_cifar10_jpeg_folder(cifar10_jpeg_root, monkeypatch):
    root = cifar10_jpeg_root
    train = D.load_split("imagefolder", root, "train")
    test = D.load_split("imagefolder", root, "test")

    assert len(train) == 50_000 and len(test) == 10_000
    assert train.class_names == CIFAR10_CLASSES and test.class_names == CIFAR10_CLASSES
    assert train.num_classes == 10
    assert (train.class_counts() == 5_000).all() and (test.class_counts() == 1_000).all()
    assert train.images.shape == (50_000, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.allclose(train.mean, OFFICIAL_MEAN, atol=2e-3), train.mean
    assert np.allclose(train.std, (0.2470, 0.2435, 0.2616), atol=5e-3), train.std  # JPEG: a bit smoother
    assert test.mean == train.mean and test.std == train.std  # training statistics

    # Label i really is the i-th class folder: spot-check one file per class.
    first = np.flatnonzero(np.diff(np.r_[-1, test.labels]))
    for label, pos in enumerate(first):
        f = sorted((root / "test" / CIFAR10_CLASSES[label]).iterdir())[0]
        np.testing.assert_array_equal(test.images[pos], imagefolder.decode_image(f))

    # Decode once: the cache is next to the data and a second load decodes nothing.
    assert list((root / ".asib_cache").glob("imagefolder_train_*.npz"))
    monkeypatch.setattr(imagefolder, "decode_files", lambda *a, **k: pytest.fail("decoded twice"))
    again = D.load_split("imagefolder", root, "test")
    np.testing.assert_array_equal(again.images, test.images)
