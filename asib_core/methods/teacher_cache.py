"""Outputs of frozen modules kept while they cannot change: the teachers' backbone features of
the validation loader (``TeacherFeatureCache``, once per run) and, for the A-step's training
samples, the teachers' features and the frozen student's query and logits
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

In the A-step the student is frozen in eval mode, so its outputs on an un-augmented training
image are the same every epoch of a stage as well: with ``a_step_augment: false`` the A-step
reads the training split without augmentation and each epoch after the first runs only
IB_MBM, the synergy head and the teachers' adapters.
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
    """Outputs of frozen modules on training samples, by dataset index, for one A-step: the
    teachers' ``feat_2d`` (:func:`train_cache_for`) or the student's query and logits
    (:func:`student_cache_for`); ``compute(x)`` gives them for a batch.

    Valid only while a sample's input and the modules' function are the same every epoch:
    modules frozen in eval mode (for teachers: not ``use_teacher_finetuning``) and a training
    loader without augmentation (augmented images differ per epoch). The first epoch computes
    and stores each sample's outputs; later epochs read them. Past ``max_bytes`` the cache is not
    built and the modules run on every batch (said in the log).
    """

    def __init__(self, num_samples: int, max_bytes: int = DEFAULT_MAX_BYTES, what: str = "teacher feature"):
        self.what = what
        self.num_samples = int(num_samples)
        self.max_bytes = int(max_bytes)
        self._feats: list[torch.Tensor] | None = None
        self._filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self._disabled = False

    @torch.no_grad()
    def features(self, compute, x: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """``compute(x)`` of the batch ``x`` (dataset indices ``idx``): stored rows are read,
        ``compute`` runs only on the samples not stored yet (eval mode: a sample's outputs do not
        depend on the rest of its batch)."""
        where = idx.cpu()
        if self._feats is not None:
            missing = ~self._filled[where]
            if not bool(missing.any()):
                return [f[idx.to(f.device)] for f in self._feats]
            rows = missing.nonzero().squeeze(1)
            new = compute(x[rows.to(x.device)])
            for store, f in zip(self._feats, new):
                store[idx[rows.to(idx.device)].to(store.device)] = f
            self._filled[where[rows]] = True
            return [f[idx.to(f.device)] for f in self._feats]
        feats = compute(x)
        if self._disabled:
            return feats
        if self._feats is None:
            nbytes = sum(self.num_samples * f[0].numel() * f.element_size() for f in feats)
            if nbytes > self.max_bytes:
                log.info("A-step %s cache: %.1f GiB needed, over %.1f GiB; computed on every batch",
                         self.what, nbytes / 2**30, self.max_bytes / 2**30)
                self._disabled = True
                return feats
            self._feats = [f.new_zeros((self.num_samples, *f.shape[1:])) for f in feats]
        for store, f in zip(self._feats, feats):
            store[idx.to(store.device)] = f
        self._filled[where] = True
        return feats


def train_cache_for(settings, loader) -> TrainFeatureCache | None:
    """A :class:`TrainFeatureCache` of the teachers' features for ``loader`` (the A-step's
    training loader) when it is valid (frozen teachers, un-augmented training images), else None."""
    if settings.use_teacher_finetuning or getattr(loader, "augment", True):
        return None
    return TrainFeatureCache(loader.dataset_size)


def student_cache_for(loader) -> TrainFeatureCache | None:
    """A :class:`TrainFeatureCache` of the frozen student's outputs for ``loader`` when its
    images are not augmented, else None."""
    if getattr(loader, "augment", True):
        return None
    return TrainFeatureCache(loader.dataset_size, what="student output")


@torch.no_grad()
def teacher_features(teachers, x: torch.Tensor, precision=None) -> list[torch.Tensor]:
    """The teachers' ``feat_2d`` of ``x`` (callers set the modes), under ``precision``'s autocast."""
    with autocast_for(precision):
        return [teacher(x)["feat_2d"] for teacher in teachers]
