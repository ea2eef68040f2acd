"""DeviceBatchLoader (order, augmentation, sharding, normalisation) and build_data."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ for fixtures_data
from fixtures_data import write_cifar10  # noqa: E402

import asib_core.data as D  # noqa: E402

IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _toy(n=50, num_classes=5, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n, 32, 32, 3), dtype=np.uint8)  # no zeros: padding shows
    labels = np.arange(n) % num_classes
    return D.ArrayDataset(images, labels, num_classes, [str(i) for i in range(num_classes)],
                          "toy", (0.4, 0.5, 0.6), (0.2, 0.25, 0.3))


def _to_u8(x):
    """Undo the identity normalisation: float [B,3,H,W] in [0,1] -> uint8 HWC numpy."""
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _reference_crop(img_hwc, dy, dx, flip, pad=4):
    padded = np.pad(img_hwc, ((pad, pad), (pad, pad), (0, 0)))
    out = padded[dy:dy + 32, dx:dx + 32]
    return out[:, ::-1] if flip else out


def test_eval_loader_order_normalisation_and_len():
    ds = _toy(50)
    loader = D.DeviceBatchLoader(ds, 16, train=False, augment=False)
    assert len(loader) == 4 and loader.num_samples == 50  # no drop_last
    xs, ys, idxs = zip(*loader)
    idx = torch.cat(idxs)
    assert idx.tolist() == list(range(50))
    assert torch.equal(torch.cat(ys), torch.as_tensor(ds.labels))
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and x.shape == (50, 3, 32, 32) and x.is_contiguous()
    mean, std = torch.tensor(ds.mean).view(1, 3, 1, 1), torch.tensor(ds.std).view(1, 3, 1, 1)
    expected = (torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-5)


def test_train_permutation_deterministic_per_seed_and_epoch():
    ds = _toy(50)
    make = lambda seed: D.DeviceBatchLoader(ds, 10, train=True, augment=True, seed=seed)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    a.set_epoch(3)
    b.set_epoch(3)
    c.set_epoch(3)
    first_a, first_b, first_c = list(a), list(b), list(c)
    for (xa, ya, ia), (xb, yb, ib) in zip(first_a, first_b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ia, ib)
    assert not torch.equal(first_a[0][2], first_c[0][2])
    # iterating again advances the epoch -> a new permutation; set_epoch replays
    assert a.epoch == 4
    assert not torch.equal(torch.cat([i for _, _, i in a]), torch.cat([i for _, _, i in first_a]))
    a.set_epoch(3)
    assert torch.equal(torch.cat([x for x, _, _ in a]), torch.cat([x for x, _, _ in first_a]))
    idx = torch.cat([i for _, _, i in first_a])
    assert len(set(idx.tolist())) == 50 and len(a) == 5


def test_drop_last_in_training():
    loader = D.DeviceBatchLoader(_toy(50), 16, train=True, augment=False)
    assert len(loader) == 3 and loader.num_samples == 48
    assert sum(int(y.numel()) for _, y, _ in loader) == 48


def test_augmentation_matches_plan_changes_images_and_keeps_labels():
    ds = _toy(40)
    loader = D.DeviceBatchLoader(ds, 40, train=True, augment=True, seed=0, **IDENTITY)
    loader.set_epoch(2)
    plan = loader.epoch_plan(2)
    x, y, idx = next(iter(loader))
    assert torch.equal(idx, plan["idx"])
    assert torch.equal(y, torch.as_tensor(ds.labels)[idx])  # label order follows idx
    out = _to_u8(x)
    changed = 0
    for k in range(40):
        i = int(idx[k])
        ref = _reference_crop(ds.images[i], int(plan["dy"][k]), int(plan["dx"][k]), bool(plan["flip"][k]))
        np.testing.assert_array_equal(out[k], ref)
        changed += not np.array_equal(out[k], ds.images[i])
    assert changed >= 30  # crops and flips really change most images
    assert plan["flip"].any() and (~plan["flip"]).any()
    assert plan["dy"].min() >= 0 and plan["dy"].max() <= 8
    assert len(set(plan["dy"].tolist())) > 3 and len(set(plan["dx"].tolist())) > 3
    border = plan["dy"] == 0  # shifted down by 4: top rows are zero padding
    if border.any():
        k = int(torch.nonzero(border)[0])
        assert (out[k, :4] == 0).all()


def test_no_augmentation_without_flag():
    ds = _toy(20)
    loader = D.DeviceBatchLoader(ds, 20, train=True, augment=False, **IDENTITY)
    x, _, idx = next(iter(loader))
    np.testing.assert_array_equal(_to_u8(x), ds.images[idx.numpy()])
    with pytest.raises(ValueError):
        D.DeviceBatchLoader(ds, 4, train=False, augment=True)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_train_ranks_disjoint_and_form_global_batches(world_size):
    ds, b = _toy(50), 4
    single = D.DeviceBatchLoader(ds, b * world_size, train=True, augment=True, seed=5)
    ranks = [D.DeviceBatchLoader(ds, b, train=True, augment=True, seed=5, rank=r,
                                 world_size=world_size) for r in range(world_size)]
    assert len({len(r) for r in ranks}) == 1
    assert len(ranks[0]) == (50 // world_size) // b
    global_batches = list(single)
    per_rank = [list(r) for r in ranks]
    seen = []
    for s in range(len(ranks[0])):
        union = torch.cat([per_rank[r][s][2] for r in range(world_size)])
        assert sorted(union.tolist()) == sorted(global_batches[s][2].tolist())
        seen += union.tolist()
        # same sample -> same augmented pixels whatever the world size
        gx = {int(i): global_batches[s][0][k] for k, i in enumerate(global_batches[s][2])}
        for r in range(world_size):
            for k, i in enumerate(per_rank[r][s][2]):
                assert torch.equal(per_rank[r][s][0][k], gx[int(i)])
    assert len(seen) == len(set(seen))


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharding_eval_covers_every_sample_once(world_size):
    ds = _toy(50)
    ranks = [D.DeviceBatchLoader(ds, 8, train=False, augment=False, rank=r, world_size=world_size)
             for r in range(world_size)]
    idx = [torch.cat([i for _, _, i in r]).tolist() for r in ranks]
    flat = sum(idx, [])
    assert sorted(flat) == list(range(50))
    assert max(map(len, idx)) - min(map(len, idx)) <= 1
    assert idx[1][:3] == [1, 1 + world_size, 1 + 2 * world_size]


def test_channels_last_and_no_index():
    ds = _toy(10)
    plain = D.DeviceBatchLoader(ds, 10, train=False, augment=False)
    cl = D.DeviceBatchLoader(ds, 10, train=False, augment=False, channels_last=True, return_index=False)
    (x, y, _), batch = next(iter(plain)), next(iter(cl))
    assert len(batch) == 2
    assert batch[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch[0], x) and torch.equal(batch[1], y)


def test_raw_arrays_and_device_tensors():
    ds = _toy(12)
    with pytest.raises(ValueError, match="mean and std"):
        D.DeviceBatchLoader((ds.images, ds.labels), 4, train=False, augment=False)
    a = D.DeviceBatchLoader((ds.images, ds.labels), 4, train=False, augment=False, mean=ds.mean, std=ds.std)
    b = D.DeviceBatchLoader((a.images, a.labels), 4, train=False, augment=False, mean=ds.mean, std=ds.std)
    assert b.images is a.images  # already on the device: no copy
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a, b))


def test_random_crop_flip_without_padding_is_flip_only():
    u8 = torch.arange(2 * 3 * 4 * 4, dtype=torch.uint8).view(2, 3, 4, 4)
    zero = torch.zeros(2, dtype=torch.long)
    out = D.random_crop_flip(u8, zero, zero, torch.tensor([True, False]), padding=0)
    assert torch.equal(out[0], u8[0].flip(-1)) and torch.equal(out[1], u8[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_stream_equals_cpu_stream():
    ds = _toy(64)
    cpu = D.DeviceBatchLoader(ds, 16, train=True, augment=True, seed=9)
    gpu = D.DeviceBatchLoader(ds, 16, train=True, augment=True, seed=9, device="cuda")
    for (xc, yc, ic), (xg, yg, ig) in zip(cpu, gpu):
        assert xg.is_cuda and torch.equal(ic, ig.cpu()) and torch.equal(yc, yg.cpu())
        torch.testing.assert_close(xc, xg.cpu())


# ----------------------------------------------------------------------------- build_data
def test_build_data_digits_splits_and_loaders():
    cfg = {"seed": 3, "dataset": {"name": "digits", "batch_size": 32, "val_split": 0.1, "data_aug": 1}}
    data = D.build_data(cfg, "cpu")
    assert len(data.train) + len(data.val) == 1437 and len(data.val) == 144
    assert len(data.test) == 360 and data.num_classes == 10 and data.class_names[3] == "3"
    assert data.val.class_counts().min() >= 14
    assert data.mean == data.train.mean
    train = data.loader("train")
    assert train.augment and train.train and train.batch_size == 32 and len(train) == 1293 // 32
    val = data.loader("val", batch_size=100)
    assert not val.augment and not val.train and len(val) == 2
    assert data.device_arrays("val")[0] is val.images  # uploaded once, shared
    ranked = data.loader("train", rank=1, world_size=2, channels_last=True)
    assert ranked.rank == 1 and ranked.channels_last
    again = D.build_data(cfg, "cpu")
    np.testing.assert_array_equal(again.val.images, data.val.images)  # same seed, same split
    data.val = D.filter_classes(data.val, [1, 2])  # a replaced split is uploaded again
    assert set(torch.cat([y for _, y, _ in data.loader("val")]).tolist()) == {1, 2}


def test_build_data_options():
    cfg = {"seed": 0, "dataset": {"name": "digits", "data_aug": 0, "val_split": 0.0,
                                  "train_per_class": 20}}
    data = D.build_data(cfg, torch.device("cpu"))
    assert len(data.val) == 0 and data.train.class_counts().tolist() == [20] * 10
    assert not data.loader("train").augment and data.batch_size == 128
    assert data.summary()["n_train"] == 200
    with pytest.raises(ValueError, match="dataset.name"):
        D.build_data({"dataset": {}}, "cpu")
    with pytest.raises(ValueError, match="Known datasets"):
        D.build_data({"dataset": {"name": "nope"}}, "cpu")


def test_build_data_from_cifar_files(tmp_path, monkeypatch):
    monkeypatch.setenv("ASIB_CACHE_DIR", str(tmp_path / "c"))
    write_cifar10(tmp_path / "d", per_batch=20)
    cfg = {"seed": 1, "dataset": {"name": "cifar10", "root": str(tmp_path / "d"), "val_split": 0.2,
                                  "batch_size": 8}}
    data = D.build_data(cfg)
    assert (len(data.train), len(data.val), len(data.test)) == (80, 20, 8)
    assert data.mean == (0.4914, 0.4822, 0.4465)
    x, y, idx = next(iter(data.loader("test")))
    assert x.shape == (8, 3, 32, 32) and idx.tolist() == list(range(8))
