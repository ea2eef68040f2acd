"""Validation split, class-overlap split, class filtering and balanced subsets."""

from __future__ import annotations

import numpy as np
import pytest

import asib_core.data as D


def _labels(counts):
    return np.concatenate([np.full(n, c) for c, n in enumerate(counts)])


def test_val_split_is_stratified_disjoint_and_covering():
    y = np.random.default_rng(0).permutation(_labels([100, 50, 30, 20]))
    tr, va = D.stratified_val_split(y, 0.1, seed=3)
    assert len(va) == 20 and len(tr) == 180
    assert np.intersect1d(tr, va).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[tr, va]), np.arange(200))
    assert np.bincount(y[va], minlength=4).tolist() == [10, 5, 3, 2]
    assert (np.diff(tr) > 0).all() and (np.diff(va) > 0).all()  # sorted
    assert tr.dtype == np.int64 and va.dtype == np.int64


def test_val_split_deterministic_per_seed():
    y = _labels([40] * 10)
    a = D.stratified_val_split(y, 0.25, seed=7)
    b = D.stratified_val_split(list(y), 0.25, seed=7)
    c = D.stratified_val_split(y, 0.25, seed=8)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[1], c[1])
    assert np.bincount(y[a[1]]).tolist() == [10] * 10


def test_val_split_total_uses_largest_remainder():
    y = _labels([7, 7, 7])  # 21 * 0.1 = 2.1 -> 2 samples, one from each of two classes
    _, va = D.stratified_val_split(y, 0.1, seed=0)
    assert len(va) == 2
    assert sorted(np.bincount(y[va], minlength=3).tolist()) == [0, 1, 1]
    y = _labels([3, 3, 4])  # 10 * 0.5 = 5: 1.5, 1.5, 2 -> 2, 1, 2 (tie to lower class id)
    _, va = D.stratified_val_split(y, 0.5, seed=0)
    assert np.bincount(y[va], minlength=3).tolist() == [2, 1, 2]


def test_val_split_zero_fraction_and_bad_fraction():
    tr, va = D.stratified_val_split(_labels([5, 5]), 0.0, seed=0)
    assert va.size == 0 and tr.tolist() == list(range(10))
    with pytest.raises(ValueError):
        D.stratified_val_split(_labels([5, 5]), 1.0, seed=0)


@pytest.mark.parametrize(
    "n, pct, shared, size1, size2",
    [
        (100, 100, 100, 100, 100),
        (100, 0, 0, 50, 50),
        (100, 50, 50, 75, 75),
        (7, 0, 0, 4, 3),  # odd rest: extra class to teacher 1
        (10, 33, 3, 7, 6),  # 3.3 -> 3 shared, rest 7 -> 4 + 3
        (10, 25, 3, 7, 6),  # 2.5 rounds half up -> 3
        (9, 100, 9, 9, 9),
        (1, 0, 0, 1, 0),
    ],
)
def test_overlap_split_rule(n, pct, shared, size1, size2):
    t1, t2 = D.overlap_class_split(n, pct, seed=42)
    assert D.shared_class_count(n, pct) == shared
    assert len(set(t1) & set(t2)) == shared
    assert (len(t1), len(t2)) == (size1, size2)
    assert sorted(set(t1) | set(t2)) == list(range(n))  # union is always every class
    assert t1 == sorted(t1) and t2 == sorted(t2)
    assert all(isinstance(c, int) for c in t1 + t2)


def test_overlap_split_deterministic_and_seeded():
    assert D.overlap_class_split(100, 40, 1) == D.overlap_class_split(100, 40, 1)
    assert D.overlap_class_split(100, 40, 1) != D.overlap_class_split(100, 40, 2)
    perm = np.random.default_rng(5).permutation(20)
    t1, t2 = D.overlap_class_split(20, 50, 5)
    assert set(t1) & set(t2) == {int(c) for c in perm[:10]}
    assert set(t1) - set(t2) == {int(c) for c in perm[10:15]}
    with pytest.raises(ValueError):
        D.overlap_class_split(10, 101, 0)


def _toy(n_per_class=(4, 3, 5), num_classes=4):
    labels = _labels(list(n_per_class))
    images = np.zeros((len(labels), 32, 32, 3), np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))  # identity tag
    return D.ArrayDataset(images, labels, num_classes, [f"c{i}" for i in range(num_classes)],
                          "toy", (0.5,) * 3, (0.25,) * 3)


def test_filter_classes_keeps_global_labels():
    ds = _toy()
    sub = D.filter_classes(ds, [2, 0])
    assert sub.num_classes == 4 and sub.class_names == ds.class_names
    assert sorted(set(sub.labels.tolist())) == [0, 2]
    assert len(sub) == 4 + 5
    np.testing.assert_array_equal(sub.labels, ds.labels[sub.images[:, 0, 0, 0]])
    assert sub.meta["classes"] == [0, 2]
    with pytest.raises(ValueError):
        D.filter_classes(ds, [4])


def test_per_class_subset_balanced_and_seeded():
    ds = _toy((6, 2, 5))
    sub = D.per_class_subset(ds, 3, seed=0)
    assert sub.class_counts().tolist() == [3, 2, 3, 0]
    tags = sub.images[:, 0, 0, 0]
    assert (np.diff(tags) > 0).all()  # original order kept
    np.testing.assert_array_equal(sub.labels, ds.labels[tags])
    same = D.per_class_subset(ds, 3, seed=0)
    np.testing.assert_array_equal(same.images, sub.images)
