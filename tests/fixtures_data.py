"""Fixtures and file writers for the data tests (imported by tests/test_data_*.py).

Kept out of conftest.py on purpose: other parts of the test suite own that file. Test modules
import what they need with ``from fixtures_data import ...`` (see the import shim at the top
of each test module).

The writers produce tiny datasets in the *official* on-disk formats (CIFAR python pickles,
Downsampled-ImageNet pickled batches) and return the arrays they wrote, so readers can be
checked for an exact round trip.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from asib_core.data.archive import extract_tarball
from asib_core.paths import cifar10_jpeg_tarball

CIFAR10_JPEG_TARBALL = cifar10_jpeg_tarball()   # ../shared or $ASIB_SHARED_DIR / $ASIB_CIFAR10_JPEG_TAR
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]


def hwc_to_rows(images: np.ndarray) -> np.ndarray:
    """``uint8 [N,32,32,3]`` -> official rows ``[N,3072]`` (R plane, G plane, B plane)."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def _dump(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def random_images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def write_cifar10(root: Path, per_batch: int = 6, n_test: int = 8, seed: int = 0) -> dict:
    """``<root>/cifar-10-batches-py`` with 5 train batches, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    train_x, train_y = [], []
    for i in range(1, 6):
        x, y = random_images(rng, per_batch), rng.integers(0, 10, per_batch)
        _dump(d / f"data_batch_{i}", {
            "batch_label": f"training batch {i} of 5",
            "labels": [int(v) for v in y],
            "data": hwc_to_rows(x),
            "filenames": [f"img_{i}_{k}.png" for k in range(per_batch)],
        })
        train_x.append(x)
        train_y.append(y)
    tx, ty = random_images(rng, n_test), rng.integers(0, 10, n_test)
    _dump(d / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": [int(v) for v in ty],
                             "data": hwc_to_rows(tx), "filenames": ["t"] * n_test})
    _dump(d / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": per_batch,
                               "num_vis": 3072})
    return {"train": (np.concatenate(train_x), np.concatenate(train_y)), "test": (tx, ty), "dir": d}


def write_cifar100(root: Path, n_train: int = 30, n_test: int = 10, seed: int = 0) -> dict:
    """``<root>/cifar-100-python`` with train, test and meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-100-python"
    out = {"dir": d}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y = random_images(rng, n), rng.integers(0, 100, n)
        _dump(d / split, {
            "filenames": [f"{split}_{k}.png" for k in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": [int(v) for v in y],
            "coarse_labels": [int(v) // 5 for v in y],
            "data": hwc_to_rows(x),
        })
        out[split] = (x, y)
    _dump(d / "meta", {"fine_label_names": [f"fine_{k:02d}" for k in range(100)],
                       "coarse_label_names": [f"coarse_{k:02d}" for k in range(20)]})
    return out


def write_imagenet32(directory: Path, per_batch: int = 3, n_val: int = 5, seed: int = 0) -> dict:
    """``train_data_batch_1..10`` and ``val_data`` in ``directory`` (labels 1-based)."""
    rng = np.random.default_rng(seed)
    directory = Path(directory)
    xs, ys = [], []
    for i in range(1, 11):
        x, y0 = random_images(rng, per_batch), rng.integers(0, 1000, per_batch)
        rows = hwc_to_rows(x)
        _dump(directory / f"train_data_batch_{i}", {
            "data": rows, "labels": [int(v) + 1 for v in y0], "mean": rows.mean(axis=0),
        })
        xs.append(x)
        ys.append(y0)
    vx, vy0 = random_images(rng, n_val), rng.integers(0, 1000, n_val)
    vy0[0], vy0[-1] = 0, 999  # both ends of the label range
    _dump(directory / "val_data", {"data": hwc_to_rows(vx), "labels": [int(v) + 1 for v in vy0]})
    return {"train": (np.concatenate(xs), np.concatenate(ys)), "test": (vx, vy0)}


_EXTRACTED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def cifar10_jpeg_root(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEG set, extracted once per test session; ``<dest>/cifar10``."""
    if not CIFAR10_JPEG_TARBALL.is_file():
        pytest.skip(
            f"real CIFAR-10 JPEG tarball not found at {CIFAR10_JPEG_TARBALL} "
            "(set ASIB_CIFAR10_JPEG_TAR to its path to run this test)"
        )
    key = str(CIFAR10_JPEG_TARBALL)
    if key not in _EXTRACTED:  # guard: the fixture may be imported into several modules
        dest = tmp_path_factory.mktemp("cifar10_jpeg")
        extract_tarball(CIFAR10_JPEG_TARBALL, dest)
        _EXTRACTED[key] = dest / "cifar10"
    return _EXTRACTED[key]
