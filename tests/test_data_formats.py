"""Readers of the official on-disk formats, the registry, root resolution and the cache."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ for fixtures_data
from fixtures_data import (  # noqa: E402
    CIFAR10_CLASSES,
    hwc_to_rows,
    write_cifar10,
    write_cifar100,
    write_imagenet32,
)

import asib_core.data as D  # noqa: E402
from asib_core.data import cache, cifar, imagefolder, imagenet32  # noqa: E402


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    monkeypatch.delenv("ASIB_DATA_ROOT", raising=False)
    monkeypatch.delenv("ASIB_DATA_CACHE", raising=False)
    monkeypatch.setenv("ASIB_CACHE_DIR", str(tmp_path / "fallback-cache"))


# ----------------------------------------------------------------------------- CIFAR
def test_cifar10_pickles_round_trip(tmp_path):
    written = write_cifar10(tmp_path, per_batch=6, n_test=8)
    for split in ("train", "test"):
        ds = D.load_split("cifar10", tmp_path, split)
        x, y = written[split]
        assert ds.images.dtype == np.uint8 and ds.images.shape == (len(x), 32, 32, 3)
        np.testing.assert_array_equal(ds.images, x)
        np.testing.assert_array_equal(ds.labels, y)
        assert ds.labels.dtype == np.int64
        assert ds.num_classes == 10 and ds.class_names == CIFAR10_CLASSES
        assert ds.mean == (0.4914, 0.4822, 0.4465) and ds.std == (0.2470, 0.2435, 0.2616)
    assert len(D.load_split("cifar10", tmp_path, "train")) == 30


def test_cifar_rows_are_rgb_planes(tmp_path):
    # Independent of the writer's transpose: row[c*1024 + y*32 + x] is pixel (y, x), channel c.
    rows = np.zeros((1, 3072), dtype=np.uint8)
    rows[0, 0 * 1024 + 2 * 32 + 5] = 11  # R at (2, 5)
    rows[0, 1 * 1024 + 7 * 32 + 1] = 22  # G at (7, 1)
    rows[0, 2 * 1024 + 31 * 32 + 31] = 33  # B at (31, 31)
    img = cifar.chw_rows_to_hwc(rows)[0]
    assert img[2, 5, 0] == 11 and img[7, 1, 1] == 22 and img[31, 31, 2] == 33
    assert int(img.sum()) == 66


def test_cifar100_pickles_round_trip_and_fine_labels(tmp_path):
    written = write_cifar100(tmp_path, n_train=30, n_test=10)
    train = D.load_split("cifar100", tmp_path, "train")
    test = D.load_split("cifar100", tmp_path, "test")
    np.testing.assert_array_equal(train.images, written["train"][0])
    np.testing.assert_array_equal(train.labels, written["train"][1])  # fine, not coarse
    np.testing.assert_array_equal(test.images, written["test"][0])
    np.testing.assert_array_equal(test.labels, written["test"][1])
    assert train.num_classes == 100 and train.class_names[7] == "fine_07"
    assert train.mean == (0.5071, 0.4867, 0.4408) and train.std == (0.2675, 0.2565, 0.2761)


def test_cifar_root_may_be_the_extracted_folder_itself(tmp_path):
    written = write_cifar10(tmp_path)
    ds = D.load_split("cifar10", written["dir"], "test")
    np.testing.assert_array_equal(ds.images, written["test"][0])


def test_cifar_missing_raises_dataset_not_found_with_path(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_split("cifar100", tmp_path, "train")
    err = info.value
    assert isinstance(err, FileNotFoundError)
    msg = str(err)
    assert "cifar100" in msg and str(tmp_path / "cifar-100-python" / "train") in msg
    assert "dataset.download=true" in msg and "cifar-100-python.tar.gz" in msg
    with pytest.raises(D.DatasetNotFoundError, match="cifar-10-batches-py"):
        D.load_split("cifar10", tmp_path, "test")


def test_cifar_download_uses_torchvision_then_reads_pickles(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    class FakeCIFAR10:  # stands in for the network download: writes the official files
        def __init__(self, root, train=True, download=False):
            calls.append((root, download))
            write_cifar10(Path(root))

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    ds = D.load_split("cifar10", tmp_path / "new", "train", download=True)
    assert calls == [(str(tmp_path / "new"), True)] and len(ds) == 30


# ----------------------------------------------------------------------------- ImageNet-32
@pytest.mark.parametrize("subdir", ["", "imagenet32"])
def test_imagenet32_round_trip_and_one_based_labels(tmp_path, subdir):
    written = write_imagenet32(tmp_path / subdir if subdir else tmp_path, per_batch=3, n_val=5)
    train = D.load_split("imagenet32", tmp_path, "train")
    test = D.load_split("imagenet32", tmp_path, "test")
    np.testing.assert_array_equal(train.images, written["train"][0])
    np.testing.assert_array_equal(train.labels, written["train"][1])  # 1-based -> 0-based
    np.testing.assert_array_equal(test.images, written["test"][0])
    np.testing.assert_array_equal(test.labels, written["test"][1])
    assert test.labels.min() == 0 and test.labels.max() == 999
    assert len(train) == 30 and train.num_classes == 1000 and len(train.class_names) == 1000
    assert train.mean == (0.485, 0.456, 0.406) and train.std == (0.229, 0.224, 0.225)


def test_imagenet32_rejects_zero_based_labels(tmp_path):
    write_imagenet32(tmp_path)
    import pickle

    with open(tmp_path / "val_data", "wb") as fh:
        pickle.dump({"data": hwc_to_rows(np.zeros((2, 32, 32, 3), np.uint8)), "labels": [0, 5]}, fh)
    with pytest.raises(ValueError, match="1-based"):
        D.load_split("imagenet32", tmp_path, "test")


def test_imagenet32_missing_names_files_and_source(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_split("imagenet32", tmp_path, "test", download=True)
    msg = str(info.value)
    assert str(tmp_path / "val_data") in msg and str(tmp_path / "imagenet32" / "val_data") in msg
    assert "train_data_batch_1" in msg and "image-net.org" in msg


# ----------------------------------------------------------------------------- image folder
def _write_png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_imagefolder_layout_modes_and_resize(tmp_path):
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    _write_png(root / "train" / "b_cls" / "0.png", a)
    _write_png(root / "train" / "b_cls" / "1.PNG", np.full((64, 48, 3), 200, np.uint8))  # resized
    _write_png(root / "train" / "a_cls" / "x.png", np.full((32, 32), 50, np.uint8))  # grey -> RGB
    (root / "train" / "a_cls" / "notes.txt").write_text("ignored")
    _write_png(root / "test" / "b_cls" / "t.png", a)
    train = D.load_split("imagefolder", root, "train")
    assert train.class_names == ["a_cls", "b_cls"] and train.num_classes == 2
    assert train.labels.tolist() == [0, 1, 1]
    assert train.images.shape == (3, 32, 32, 3)
    assert (train.images[0] == 50).all() and (train.images[2] == 200).all()
    np.testing.assert_array_equal(train.images[1], a)
    mean, std = D.channel_stats(train.images)
    assert train.mean == pytest.approx(mean) and train.std == pytest.approx(std)
    test = D.load_split("imagefolder", root, "test")
    assert test.labels.tolist() == [1] and test.mean == train.mean  # train statistics
    np.testing.assert_array_equal(test.images[0], a)


def test_imagefolder_missing_layout(tmp_path):
    with pytest.raises(D.DatasetNotFoundError) as info:
        D.load_split("imagefolder", tmp_path / "nothing", "test")
    msg = str(info.value)
    assert str(tmp_path / "nothing" / "train") in msg and "<root>/train/<class>" in msg


# ----------------------------------------------------------------------------- digits
def test_digits_real_data_split():
    train = D.load_split("digits", None, "train")
    test = D.load_split("digits", None, "test")
    assert len(train) + len(test) == 1797 and len(test) == 360
    assert train.images.shape[1:] == (32, 32, 3) and train.images.dtype == np.uint8
    assert train.num_classes == 10 and train.class_names == [str(d) for d in range(10)]
    assert (train.images[..., 0] == train.images[..., 2]).all()  # grey replicated
    assert train.images.max() == 255 and train.images.min() == 0
    counts = test.class_counts()
    assert counts.min() >= 35 and counts.max() <= 37  # stratified 20 %
    mean, std = D.channel_stats(train.images)
    assert train.mean == pytest.approx(mean) and test.mean == train.mean
    again = D.load_split("digits", "/somewhere/else", "test")
    np.testing.assert_array_equal(again.images, test.images)


# ----------------------------------------------------------------------------- registry, root
def test_unknown_dataset_lists_known_names(tmp_path):
    with pytest.raises(ValueError) as info:
        D.load_split("mnist", tmp_path, "train")
    for name in ("cifar10", "cifar100", "digits", "imagefolder", "imagenet32"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="split"):
        D.load_split("digits", tmp_path, "validation")


def test_root_resolution_env_var(monkeypatch, tmp_path):
    assert D.resolve_root("./data") == Path("data")
    monkeypatch.setenv("ASIB_DATA_ROOT", str(tmp_path))
    assert D.resolve_root("./data") == tmp_path
    assert D.resolve_root("data") == tmp_path
    assert D.resolve_root(None) == tmp_path
    assert D.resolve_root(tmp_path / "explicit") == tmp_path / "explicit"
    write_cifar10(tmp_path)
    assert len(D.load_split("cifar10", "./data", "test")) == 8


# ----------------------------------------------------------------------------- cache
def test_second_load_hits_cache_without_decoding(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    first = D.load_split("cifar10", tmp_path, "train")
    files = list((tmp_path / ".asib_cache").glob("cifar10_train_*.npz"))
    assert len(files) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(cifar, "_decode", no_decode)
    second = D.load_split("cifar10", tmp_path, "train")
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.labels, second.labels)
    assert second.class_names == CIFAR10_CLASSES


def test_cache_key_changes_when_a_source_file_changes(tmp_path, monkeypatch):
    write_cifar10(tmp_path, seed=0)
    D.load_split("cifar10", tmp_path, "test")
    write_cifar10(tmp_path, seed=1, n_test=9)  # new content and size
    calls = []
    real = cifar._decode
    monkeypatch.setattr(cifar, "_decode", lambda *a: calls.append(1) or real(*a))
    ds = D.load_split("cifar10", tmp_path, "test")
    assert calls == [1] and len(ds) == 9
    assert len(list((tmp_path / ".asib_cache").glob("cifar10_test_*.npz"))) == 2


def test_cache_falls_back_when_data_dir_is_not_writable(tmp_path, monkeypatch):
    write_imagenet32(tmp_path)
    (tmp_path / ".asib_cache").write_text("a file where the cache directory would go")
    fallback = tmp_path / "fallback-cache"
    D.load_split("imagenet32", tmp_path, "test")
    assert len(list(fallback.glob("imagenet32_test_*.npz"))) == 1
    monkeypatch.setattr(imagenet32, "_decode", lambda *a: pytest.fail("cache not used"))
    assert len(D.load_split("imagenet32", tmp_path, "test")) == 5


def test_corrupt_cache_is_rebuilt(tmp_path):
    written = write_cifar100(tmp_path)
    D.load_split("cifar100", tmp_path, "test")
    (cache_file,) = (tmp_path / ".asib_cache").glob("cifar100_test_*.npz")
    cache_file.write_bytes(b"truncated")
    ds = D.load_split("cifar100", tmp_path, "test")
    np.testing.assert_array_equal(ds.images, written["test"][0])


def test_cache_can_be_disabled(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIB_DATA_CACHE", "0")
    write_cifar10(tmp_path)
    D.load_split("cifar10", tmp_path, "test")
    assert not (tmp_path / ".asib_cache").exists()


def test_fallback_cache_dir_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("ASIB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache.fallback_cache_dir() == tmp_path / "asib-kd"
    monkeypatch.setenv("ASIB_CACHE_DIR", str(tmp_path / "x"))
    assert cache.fallback_cache_dir() == tmp_path / "x"


def test_imagefolder_cache_hit_counts_decodes(tmp_path, monkeypatch):
    root = tmp_path / "f"
    for k in range(3):
        _write_png(root / "train" / "c" / f"{k}.png", np.full((32, 32, 3), k, np.uint8))
    _write_png(root / "test" / "c" / "0.png", np.zeros((32, 32, 3), np.uint8))
    calls = []
    real = imagefolder.decode_files
    monkeypatch.setattr(imagefolder, "decode_files", lambda files, *a: calls.append(len(files)) or real(files, *a))
    for _ in range(2):
        D.load_split("imagefolder", root, "train")
        D.load_split("imagefolder", root, "test")
    assert calls == [3, 1]  # each split decoded once
