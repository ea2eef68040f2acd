"""Deterministic index and class splits.

All randomness comes from ``numpy.random.default_rng(seed)`` (PCG64), whose streams are
stable across platforms and numpy versions, so a seed always gives the same split.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Sequence

import numpy as np

from .dataset import ArrayDataset


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over classes proportionally to ``counts`` (largest remainder method).

    Each class gets ``floor(count * total / N)`` or one more; the extra units go to the
    largest fractional parts, ties to the lower class id.
    """
    n = int(counts.sum())
    exact = [Fraction(int(c) * total, n) for c in counts]
    base = np.array([int(e) for e in exact], dtype=np.int64)  # floor (all non-negative)
    remainder = total - int(base.sum())
    order = sorted(range(len(counts)), key=lambda k: (-(exact[k] - base[k]), k))
    for k in order[:remainder]:
        base[k] += 1
    return base


def stratified_val_split(
    labels: Sequence[int] | np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Class-stratified train/validation split of ``range(len(labels))``.

    The validation set has ``round_half_up(N * val_fraction)`` samples, spread over the
    classes proportionally to their sizes (largest remainder method). Within each class the
    validation samples are the first ones of a seeded permutation of that class's indices
    (classes visited in increasing label order, one ``default_rng(seed)`` stream).

    Returns:
        ``(train_idx, val_idx)``: disjoint, sorted ``int64`` arrays covering all indices.
        ``val_fraction == 0`` gives an empty ``val_idx``.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(y)
    if n == 0 or val_fraction == 0:
        return np.arange(n, dtype=np.int64), np.empty(0, dtype=np.int64)
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse, minlength=len(classes))
    n_val = int(Fraction(str(float(val_fraction))) * n + Fraction(1, 2))
    per_class = _allocate(counts, n_val)
    rng = np.random.default_rng(seed)
    val_parts = []
    for k in range(len(classes)):
        members = np.flatnonzero(inverse == k)
        val_parts.append(rng.permutation(members)[: per_class[k]])
    val_idx = np.sort(np.concatenate(val_parts)).astype(np.int64)
    mask = np.ones(n, dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask).astype(np.int64), val_idx


def shared_class_count(num_classes: int, overlap_pct: float) -> int:
    """``floor(num_classes * overlap_pct / 100 + 1/2)``, computed exactly (round half up)."""
    return int(Fraction(int(num_classes)) * Fraction(str(float(overlap_pct))) / 100 + Fraction(1, 2))


def overlap_class_split(
    num_classes: int, overlap_pct: float, seed: int
) -> tuple[list[int], list[int]]:
    """Class lists of two teachers that share ``overlap_pct`` percent of the classes.

    Rule: ``perm = default_rng(seed).permutation(num_classes)``;
    ``m = shared_class_count(num_classes, overlap_pct)``; shared = ``perm[:m]``;
    rest = ``perm[m:]``, of which teacher 1 takes the first ``ceil(len(rest) / 2)`` and
    teacher 2 the remainder. Each list is the sorted union of shared and own classes, so the
    union of both lists is always every class. ``100`` -> both get all classes; ``0`` ->
    disjoint halves (teacher 1 one larger when ``num_classes`` is odd).
    """
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    if not 0 <= float(overlap_pct) <= 100:
        raise ValueError(f"overlap_pct must be in [0, 100], got {overlap_pct}")
    perm = np.random.default_rng(seed).permutation(num_classes)
    m = shared_class_count(num_classes, overlap_pct)
    shared, rest = perm[:m], perm[m:]
    h1 = (len(rest) + 1) // 2
    t1 = sorted(int(c) for c in np.concatenate([shared, rest[:h1]]))
    t2 = sorted(int(c) for c in np.concatenate([shared, rest[h1:]]))
    return t1, t2


def filter_classes(ds: ArrayDataset, classes: Sequence[int]) -> ArrayDataset:
    """Only the samples whose label is in ``classes``; labels stay in the global label space.

    ``num_classes`` and ``class_names`` are unchanged, so a model trained on the subset still
    has one output per global class. The list of kept classes is stored in
    ``result.meta["classes"]``.
    """
    keep = np.asarray(sorted({int(c) for c in classes}), dtype=np.int64)
    if keep.size and (keep.min() < 0 or keep.max() >= ds.num_classes):
        raise ValueError(f"class ids must be in [0, {ds.num_classes})")
    out = ds.subset(np.flatnonzero(np.isin(ds.labels, keep)))
    out.meta["classes"] = keep.tolist()
    return out


def per_class_subset_indices(labels: Sequence[int] | np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Sorted positions of a balanced subset: ``n_per_class`` random samples of every class.

    The chosen positions are the first ``n_per_class`` of a seeded permutation of each
    class's positions (one ``default_rng(seed)`` stream, classes in increasing label order;
    a smaller class gives all of its samples).
    """
    if n_per_class < 1:
        raise ValueError("n_per_class must be >= 1")
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    rng = np.random.default_rng(seed)
    parts = []
    for c in range(int(y.max()) + 1 if y.size else 0):
        members = np.flatnonzero(y == c)
        if members.size:
            parts.append(rng.permutation(members)[:n_per_class])
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, dtype=np.int64)


def per_class_subset(ds: ArrayDataset, n_per_class: int, seed: int) -> ArrayDataset:
    """A balanced subset of ``ds`` (:func:`per_class_subset_indices`), original order kept."""
    return ds.subset(per_class_subset_indices(ds.labels, n_per_class, seed))
