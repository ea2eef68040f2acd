"""Teacher backbone features kept while they cannot change: the validation loader's
(``TeacherFeatureCache``, once per run) and the A-step's training samples
(``TrainFeatureCache``, once per stage, only without augmentation).

The A-step measures the synergy's validation accuracy after every epoch, and each
measurement runs both teachers over the whole validation split. Unless
``use_teacher_finetuning`` is on, the teacher backbones never change during a run: only
their distillation adapters train. So their eval-mode ``feat_2d`` on a fixed (unshuffled,
unaugmented) loader is the same every time; this cache keeps it, and each measurement runs
only the student, the adapters, IB_MBM and the head. The teachers' share of an A-step's
validation goes from every epoch to once per run.

The cache checks the labels of every batch against the first pass; a loader that yields
other samples (or another order) is read live and the cache rebuilt. Past ``max_bytes``
the cache gives up and every pass runs the teachers (said once in the log).
"""
from __future__ import annotations

import logging
from typing import Iterator

import torch

from asib_core.engine.amp import autocast_for

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 2 << 30


class TeacherFeatureCache:
    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = int(max_bytes)
        self._key: tuple | None = None
        self._labels: list[torch.Tensor] = []
        self._feats: list[list[torch.Tensor]] = []   # per batch: one feat_2d per teacher
        self.nbytes = 0
        self._disabled = False

    def clear(self) -> None:
        self._key, self._labels, self._feats, self.nbytes = None, [], [], 0

    def batches(self, loader, teachers, precision=None) -> Iterator[tuple[torch.Tensor, torch.Tensor, list]]:
        """``(x, y, feats)`` per batch, ``feats`` the teachers' ``feat_2d`` (eval mode, no grad,
        under ``precision``'s autocast), from the cache when it holds this loader, else computed
        (and kept when it fits)."""
        key = (id(loader), len(loader))
        if self._key == key and not self._disabled:
            yield from self._replay(loader, teachers, precision)
            return
        self.clear()
        filling = not self._disabled
        for x, y, *_ in loader:
            feats = teacher_features(teachers, x, precision)
            if filling:
                self._labels.append(y.clone())
                self._feats.append(feats)
                self.nbytes += sum(f.numel() * f.element_size() for f in feats)
                if self.nbytes > self.max_bytes:
                    log.info("teacher feature cache: over %.1f GiB, the teachers run on every validation "
                             "pass", self.max_bytes / 2**30)
                    self._disabled, filling = True, False
                    self.clear()
            yield x, y, feats
        if filling:
            self._key = key

    def _replay(self, loader, teachers, precision):
        labels, feats, live = self._labels, self._feats, False
        for i, (x, y, *_) in enumerate(loader):
            if not live and (i >= len(labels) or not torch.equal(labels[i], y)):
                log.info("teacher feature cache: the loader's samples changed; the next pass rebuilds it")
                self.clear()
                live = True
            yield x, y, (teacher_features(teachers, x, precision) if live else feats[i])


class TrainFeatureCache:
    """The teachers' ``feat_2d`` of training samples, by dataset index, for one A-step.

    Valid only while a sample's input and the teachers' function are the same every epoch:
    frozen teacher backbones in eval mode (not ``use_teacher_finetuning``) and a training loader
    without augmentation (augmented images differ per epoch; :func:`train_cache_for` decides).
    The first epoch computes and stores each sample's features; later epochs read them. Past
    ``max_bytes`` the cache is not built and the teachers run on every batch (said in the log).
    """

    def __init__(self, num_samples: int, max_bytes: int = DEFAULT_MAX_BYTES):
        self.num_samples = int(num_samples)
        self.max_bytes = int(max_bytes)
        self._feats: list[torch.Tensor] | None = None
        self._filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self._disabled = False

    @torch.no_grad()
    def features(self, teachers, x: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """The teachers' ``feat_2d`` of the batch ``x`` (dataset indices ``idx``): stored rows
        are read, the teachers run only on the samples not stored yet (eval mode: a sample's
        features do not depend on the rest of its batch)."""
        where = idx.cpu()
        if self._feats is not None:
            missing = ~self._filled[where]
            if not bool(missing.any()):
                return [f[idx.to(f.device)] for f in self._feats]
            rows = missing.nonzero().squeeze(1)
            new = teacher_features(teachers, x[rows.to(x.device)])
            for store, f in zip(self._feats, new):
                store[idx[rows.to(idx.device)].to(store.device)] = f
            self._filled[where[rows]] = True
            return [f[idx.to(f.device)] for f in self._feats]
        feats = teacher_features(teachers, x)
        if self._disabled:
            return feats
        if self._feats is None:
            nbytes = sum(self.num_samples * f[0].numel() * f.element_size() for f in feats)
            if nbytes > self.max_bytes:
                log.info("A-step teacher feature cache: %.1f GiB needed, over %.1f GiB; the teachers run on "
                         "every batch", nbytes / 2**30, self.max_bytes / 2**30)
                self._disabled = True
                return feats
            self._feats = [f.new_zeros((self.num_samples, *f.shape[1:])) for f in feats]
        for store, f in zip(self._feats, feats):
            store[idx.to(store.device)] = f
        self._filled[where] = True
        return feats


def train_cache_for(settings, loader) -> TrainFeatureCache | None:
    """A :class:`TrainFeatureCache` for ``loader`` (the training loader) when it is valid
    (frozen teachers, un-augmented training images), else None."""
    if settings.use_teacher_finetuning or getattr(loader, "augment", True):
        return None
    return TrainFeatureCache(loader.dataset_size)


@torch.no_grad()
def teacher_features(teachers, x: torch.Tensor, precision=None) -> list[torch.Tensor]:
    """The teachers' ``feat_2d`` of ``x`` (callers set the modes), under ``precision``'s autocast."""
    with autocast_for(precision):
        return [teacher(x)["feat_2d"] for teacher in teachers]
