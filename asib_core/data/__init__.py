"""Data for asib-kd: dataset readers, decode-once cache, splits, device batches, mixing.

See ``docs/data.md`` for layouts on disk, environment variables and the exact split,
sharding, augmentation and mixing rules.
"""

from .batches import DeviceBatchLoader, epoch_seed, random_crop_flip
from .bundle import DATASET_KEY_DEFAULTS, DataBundle, build_data, check_trainable
from .dataset import ArrayDataset, DataError, DatasetNotFoundError, channel_stats
from .mixing import MixedBatch, mix_batch, mixed_cross_entropy
from .registry import DATASETS, dataset_names, load_split, resolve_root
from .splits import (
    filter_classes,
    overlap_class_split,
    per_class_subset,
    shared_class_count,
    stratified_val_split,
)

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "DATASET_KEY_DEFAULTS",
    "DataBundle",
    "DataError",
    "DatasetNotFoundError",
    "DeviceBatchLoader",
    "MixedBatch",
    "build_data",
    "channel_stats",
    "check_trainable",
    "dataset_names",
    "epoch_seed",
    "filter_classes",
    "load_split",
    "mix_batch",
    "mixed_cross_entropy",
    "overlap_class_split",
    "per_class_subset",
    "random_crop_flip",
    "resolve_root",
    "shared_class_count",
    "stratified_val_split",
]
