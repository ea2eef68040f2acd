"""Teacher backbone features of the validation loader, computed once per run.

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


@torch.no_grad()
def teacher_features(teachers, x: torch.Tensor, precision=None) -> list[torch.Tensor]:
    """The teachers' ``feat_2d`` of ``x`` (callers set the modes), under ``precision``'s autocast."""
    with autocast_for(precision):
        return [teacher(x)["feat_2d"] for teacher in teachers]
