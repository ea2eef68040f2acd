"""Build the train / validation / test data of a run from its effective config."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .batches import DeviceBatchLoader
from .dataset import ArrayDataset, DataError
from .identity import SplitRecord, content_fingerprint, split_indices
from .registry import DEFAULT_ROOT, load_split, resolve_root

# Keys of ``cfg["dataset"]`` that build_data reads (with their defaults; None = required).
DATASET_KEY_DEFAULTS: dict[str, Any] = {
    "name": None,
    "root": DEFAULT_ROOT,
    "download": False,
    "val_split": 0.1,
    "data_aug": 1,
    "batch_size": 128,
    "train_per_class": None,
    "split_seed": 42,  # fixed by default; None: the run's top-level ``seed``
    "pin_memory": False,
    "backend": "native",
}


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in {"", "0", "false", "no", "off", "none"}
    return bool(value)


@dataclass
class DataBundle:
    """The three splits of a run and a factory for their device loaders.

    ``val`` is held out from the official training split (class-stratified, seeded) and is
    what model selection must use; ``test`` is the official test split, for the final
    evaluation only.
    """

    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    name: str
    device: torch.device
    batch_size: int
    data_aug: bool
    seed: int
    root: str = ""
    pin_memory: bool = False
    #: how ``train``/``val`` were cut from the official training split (see data/identity.py)
    split_record: SplitRecord | None = None
    #: positions of ``train`` / ``val`` samples in the official training split
    train_source_index: Any = None
    val_source_index: Any = None
    #: labels of the official training split (to recompute another model's split)
    source_labels: Any = None
    _device_arrays: dict = field(default_factory=dict, repr=False)

    def split(self, name: str) -> ArrayDataset:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be train, val or test, got '{name}'")
        return getattr(self, name)

    def device_arrays(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images NCHW uint8, labels int64)`` of a split on the device, uploaded once.

        The copy is tied to the split's dataset object: assigning a new dataset to
        ``bundle.train`` (e.g. ``filter_classes(bundle.train, ...)``) uploads the new one.
        """
        ds = self.split(name)
        cached = self._device_arrays.get(name)
        if cached is None or cached[0] is not ds:
            source = (ds.images, ds.labels)
            if self.pin_memory and self.device.type == "cuda":  # page-locked staging for the upload
                source = (torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous().pin_memory(),
                          torch.from_numpy(ds.labels).pin_memory())
            loader = DeviceBatchLoader(source, 1, train=False, augment=False, device=self.device,
                                       mean=self.mean, std=self.std)
            cached = (ds, loader.images, loader.labels)
            self._device_arrays[name] = cached
        return cached[1], cached[2]

    def loader(
        self,
        split: str,
        *,
        train: bool | None = None,
        batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
        augment: bool | None = None,
        drop_last: bool | None = None,
        return_index: bool = True,
    ) -> DeviceBatchLoader:
        """A :class:`DeviceBatchLoader` over ``split`` (train/val/test).

        ``train`` defaults to ``split == "train"``; augmentation defaults to
        ``train and data_aug``. The device copy of the split is shared by all its loaders.
        """
        is_train = (split == "train") if train is None else bool(train)
        do_aug = (is_train and self.data_aug) if augment is None else bool(augment)
        return DeviceBatchLoader(
            self.device_arrays(split),
            batch_size or self.batch_size,
            train=is_train,
            augment=do_aug,
            mean=self.mean,
            std=self.std,
            device=self.device,
            seed=self.seed,
            drop_last=drop_last,
            channels_last=channels_last,
            rank=rank,
            world_size=world_size,
            return_index=return_index,
        )

    def summary(self) -> dict[str, Any]:
        """Small dict for logging (sizes, classes, normalisation)."""
        return {
            "dataset": self.name,
            "num_classes": self.num_classes,
            "n_train": len(self.train),
            "n_val": len(self.val),
            "n_test": len(self.test),
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _dataset_cfg(cfg: Mapping) -> dict[str, Any]:
    raw = cfg.get("dataset")
    if raw is None:
        raise ValueError("config has no 'dataset' section")
    out = {k: raw.get(k, default) for k, default in DATASET_KEY_DEFAULTS.items()}
    if not out["name"]:
        raise ValueError("dataset.name is required (e.g. cifar100, imagenet32, imagefolder, digits)")
    return out


def build_data(cfg: Mapping, device: torch.device | str = "cpu") -> DataBundle:
    """Load the configured dataset and split it into train / val / test.

    Reads ``cfg["seed"]`` (default 0) and ``cfg["dataset"]`` keys ``name``, ``root``,
    ``download``, ``val_split``, ``data_aug``, ``batch_size``, ``train_per_class`` and
    ``split_seed`` (see ``DATASET_KEY_DEFAULTS``). Order of operations:

    1. load the official train and test splits (:func:`load_split`);
    2. hold out ``val_split`` of the train split, class-stratified, with ``split_seed``
       (default 42, fixed, so that teachers and students of any run seed share one
       validation split; ``null``: the run's ``seed``);
    3. if ``train_per_class`` is set, keep a balanced subset of that many samples per class
       of the remaining train part (same seed); the validation part is not reduced.
    """
    d = _dataset_cfg(cfg)
    seed = int(cfg.get("seed", 0) or 0)
    split_seed = seed if d["split_seed"] is None else int(d["split_seed"])
    name, root = str(d["name"]).lower(), d["root"]
    if d["backend"] not in ("native", "torchvision"):
        raise ValueError(f"dataset.backend={d['backend']!r}: use native or torchvision")
    if d["backend"] == "torchvision" and name in ("cifar10", "cifar100"):
        open_with_torchvision(name, root, download=_truthy(d["download"]))
    full_train = load_split(name, root, "train", download=_truthy(d["download"]))
    test = load_split(name, root, "test", download=_truthy(d["download"]))

    per_class = None if d["train_per_class"] in (None, 0, "", "null") else int(d["train_per_class"])
    train_idx, val_idx = split_indices(full_train.labels, float(d["val_split"]), split_seed, per_class)
    record = SplitRecord(dataset=name, source_fingerprint=content_fingerprint(full_train.images, full_train.labels),
                         n_source=len(full_train), val_split=float(d["val_split"]), split_seed=split_seed,
                         train_per_class=per_class)
    train = full_train.subset(train_idx, split="train")
    val = full_train.subset(val_idx, split="val")
    source_labels = full_train.labels
    del full_train

    return DataBundle(
        train=train,
        val=val,
        test=test,
        num_classes=train.num_classes,
        class_names=list(train.class_names),
        mean=tuple(train.mean),  # type: ignore[arg-type]
        std=tuple(train.std),  # type: ignore[arg-type]
        name=name,
        device=torch.device(device),
        batch_size=int(d["batch_size"]),
        data_aug=_truthy(d["data_aug"]),
        seed=seed,
        root=str(resolve_root(root)),
        pin_memory=_truthy(d["pin_memory"]),
        split_record=record,
        train_source_index=train_idx,
        val_source_index=val_idx,
        source_labels=source_labels,
    )


def _names(ds: ArrayDataset, classes: np.ndarray) -> str:
    shown = [repr(ds.class_names[int(c)]) for c in classes[:10]]
    return ", ".join(shown) + (f" and {len(classes) - 10} more" if len(classes) > 10 else "")


def check_trainable(data: DataBundle, world_size: int = 1) -> None:
    """Refuse data a training step cannot learn from (a :class:`DataError` naming the numbers
    and the fix). The training steps (distill, finetune) call it right after :func:`build_data`,
    before any model is built; :func:`build_data` itself stays a plain loader.

    * at least two classes;
    * every class has training images (after the validation hold-out and ``train_per_class``)
      and test images (the test split covers every class the model is trained on);
    * a validation hold-out that was asked for (``val_split > 0``) is not empty;
    * the training split holds at least one batch per process: training batches are whole
      (the last partial batch of an epoch is dropped, see ``batches.py``), so a smaller split
      would train no step at all; with ``world_size`` processes it must hold
      ``batch_size * world_size`` images.
    """
    train, val, test = data.train, data.val, data.test
    name = f"{data.name} ({data.root})" if data.name == "imagefolder" else data.name
    if data.num_classes < 2:
        raise DataError(
            f"{name}: the dataset has {data.num_classes} class ({', '.join(data.class_names)}); a "
            "classifier needs at least two classes. For an image folder, add a sub-folder per class "
            "under train/ and test/."
        )
    for ds, what in ((train, "training"), (test, "test")):
        empty = np.flatnonzero(ds.class_counts() == 0)
        if empty.size:
            extra = (" after the validation hold-out (dataset.val_split) and dataset.train_per_class"
                     if ds is train else "")
            raise DataError(
                f"{name}: {empty.size} of {ds.num_classes} classes have no {what} images{extra}: "
                f"{_names(ds, empty)}. Every class needs training and test images (for an image "
                "folder: train/<class>/ and test/<class>/ with images in each)."
            )
    if len(val) == 0 and data.split_record.val_split > 0:
        raise DataError(
            f"{name}: the validation split is empty (dataset.val_split={data.split_record.val_split:g} of "
            f"{len(train)} training images rounds to no image); model selection needs it. Raise "
            "dataset.val_split or use more data."
        )
    world = max(int(world_size), 1)
    if len(train) < data.batch_size * world:
        per = f" per process x {world} processes" if world > 1 else ""
        raise DataError(
            f"{name}: the training split has {len(train)} images, fewer than one batch "
            f"(batch size {data.batch_size}{per}: dataset.batch_size, or batch_size of a fine-tune "
            "recipe); the last partial batch of an epoch is dropped, so no training step would run. "
            f"Set the batch size to at most {len(train) // world} or train on more images "
            "(dataset.train_per_class, dataset.val_split)."
        )


def open_with_torchvision(name: str, root, download: bool) -> None:
    """``dataset.backend: torchvision``: let torchvision's CIFAR class open (and integrity-check,
    or download) the official files; the arrays are then read by our reader of the same files."""
    import torchvision.datasets as tvd

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100}[name]
    folder = resolve_root(root)
    try:
        for train in (True, False):
            cls(str(folder), train=train, download=download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        from .dataset import DatasetNotFoundError
        raise DatasetNotFoundError(name, [folder], f"torchvision could not open it ({exc}). Set "
                                   "dataset.download=true on a machine with internet access.") from None
