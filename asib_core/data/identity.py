"""Split identity: which images of a dataset a model trained on, recorded and checked.

A model is trained on part of a dataset's official training split (the *source*): the
validation hold-out is removed (``val_split``, class-stratified, ``split_seed``), optionally
a balanced ``train_per_class`` subset is kept, and an overlap teacher keeps only its classes.
:class:`SplitRecord` holds exactly the inputs of that selection plus a content fingerprint
of the source, so the selected indices can be recomputed anywhere from the same data:

* a teacher checkpoint stores the record of its fine-tuning data (``meta["data"]``);
* a student run recomputes each teacher's training indices and refuses to start when its
  own validation split contains any of them (decisions.md, "Teachers and splits").

Everything here is deterministic: the splits come from ``asib_core.data.splits`` (seeded
PCG64 streams) and the fingerprint from the image bytes and labels, not from file names.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from .splits import per_class_subset_indices, stratified_val_split

FINGERPRINT_CHUNK = 1 << 24  # bytes hashed per update (bounded memory for large splits)


def content_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 over the image bytes (in order), their shape and the labels."""
    digest = hashlib.sha256()
    images = np.ascontiguousarray(images)
    digest.update(repr((images.dtype.str, images.shape)).encode())
    flat = images.reshape(-1).view(np.uint8)
    for start in range(0, flat.size, FINGERPRINT_CHUNK):
        digest.update(flat[start:start + FINGERPRINT_CHUNK].tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class SplitRecord:
    """How a training set was cut out of a dataset's official training split."""

    dataset: str
    source_fingerprint: str
    n_source: int
    val_split: float
    split_seed: int
    train_per_class: int | None = None
    classes: list[int] | None = field(default=None)

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "SplitRecord":
        classes = raw.get("classes")
        per_class = raw.get("train_per_class")
        return cls(dataset=str(raw["dataset"]), source_fingerprint=str(raw["source_fingerprint"]),
                   n_source=int(raw["n_source"]), val_split=float(raw["val_split"]),
                   split_seed=int(raw["split_seed"]),
                   train_per_class=None if per_class is None else int(per_class),
                   classes=None if classes is None else [int(c) for c in classes])

    def with_classes(self, classes) -> "SplitRecord":
        return SplitRecord(self.dataset, self.source_fingerprint, self.n_source, self.val_split,
                           self.split_seed, self.train_per_class,
                           None if classes is None else sorted(int(c) for c in classes))

    def describe(self) -> str:
        parts = [f"dataset={self.dataset}", f"val_split={self.val_split:g}", f"split_seed={self.split_seed}"]
        if self.train_per_class:
            parts.append(f"train_per_class={self.train_per_class}")
        if self.classes is not None:
            parts.append(f"{len(self.classes)} classes")
        return ", ".join(parts)


def split_indices(labels: np.ndarray, val_split: float, split_seed: int,
                  train_per_class: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)`` into the source split: the one rule build_data follows."""
    labels = np.asarray(labels, dtype=np.int64)
    train_idx, val_idx = stratified_val_split(labels, float(val_split), int(split_seed))
    if train_per_class:
        train_idx = train_idx[per_class_subset_indices(labels[train_idx], int(train_per_class), int(split_seed))]
    return train_idx, val_idx


def trained_indices(record: SplitRecord, labels: np.ndarray) -> np.ndarray:
    """Indices of the source images a model with this record trained on."""
    train_idx, _ = split_indices(labels, record.val_split, record.split_seed, record.train_per_class)
    if record.classes is not None:
        train_idx = train_idx[np.isin(np.asarray(labels)[train_idx], np.asarray(record.classes))]
    return train_idx


def split_fingerprint(bundle, split: str) -> str:
    """SHA-256 that names exactly the images and labels of one split of a DataBundle.

    ``train``/``val`` as cut by :func:`split_indices`: the source fingerprint of the split record
    (the bytes of the official training split) plus the selected indices, so no image is hashed
    again; a split changed after the cut (e.g. an overlap teacher's class filter) and
    ``test``: :func:`content_fingerprint` of its arrays."""
    ds = bundle.split(split)
    record = getattr(bundle, "split_record", None)
    index = getattr(bundle, f"{split}_source_index", None) if split in ("train", "val") else None
    if record is not None and index is not None and len(index) == len(ds):
        digest = hashlib.sha256(record.source_fingerprint.encode())
        digest.update(np.ascontiguousarray(index, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(ds.labels, dtype=np.int64).tobytes())
        return digest.hexdigest()
    return content_fingerprint(ds.images, ds.labels)
