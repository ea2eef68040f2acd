"""No teacher ever saw a student-validation image (decisions.md, "Teachers and splits").

A fine-tuned teacher's checkpoint records how its training images were cut out of the
dataset's official training split (``meta["data"]``, a :class:`SplitRecord`). Before a
distillation run builds any model, :func:`check_teacher_splits` recomputes each teacher's
training indices on this run's data and refuses to start when the run's validation split
contains any of them, naming the teacher, both splits and the fix. The project default
``dataset.split_seed: 42`` gives teachers and students the same split, so this only stops
runs whose split settings were changed on one side.

Checkpoints that record nothing (e.g. a teacher trained outside asib-kd) and teachers trained
on other data (another fingerprint) cannot be checked; the run goes on with a warning.
"""
from __future__ import annotations

import logging
import numpy as np

from asib_core.config.errors import ConfigError
from asib_core.data.identity import SplitRecord, trained_indices

log = logging.getLogger(__name__)


class TeacherSplitError(ConfigError):
    """The run's validation split contains images a teacher trained on."""


def split_record_of(meta: dict | None) -> SplitRecord | None:
    """The training-split record in a teacher checkpoint's ``meta`` (None when it has none)."""
    raw = meta.get("data") if isinstance(meta, dict) else None
    if not isinstance(raw, dict):
        return None
    try:
        return SplitRecord.from_dict(raw)
    except (KeyError, TypeError, ValueError):
        return None


def check_teacher_splits(data, sources, metas) -> list[str]:
    """Refuse (``TeacherSplitError``) when a teacher trained on a validation image of ``data``.

    ``sources``: the run's :class:`~asib_core.pipeline.teachers.TeacherSource` list; ``metas``:
    their checkpoints' ``meta`` dicts, in the same order. Returns the warnings for teachers that
    could not be checked (also logged).
    """
    mine: SplitRecord = data.split_record
    warnings = []
    for source, meta in zip(sources, metas, strict=True):
        record = split_record_of(meta)
        if record is None:
            warnings.append(f"{source.role} '{source.name}' ({source.path}) records no training split: "
                            "cannot check that it never trained on this run's validation images")
            continue
        if (record.dataset, record.source_fingerprint) != (mine.dataset, mine.source_fingerprint):
            warnings.append(f"{source.role} '{source.name}' was trained on other data ({record.dataset}, "
                            f"fingerprint {record.source_fingerprint[:12]}) than this run's "
                            f"({mine.dataset}, {mine.source_fingerprint[:12]}): its split cannot be checked")
            continue
        seen = np.intersect1d(trained_indices(record, data.source_labels), data.val_source_index)
        if seen.size:
            raise TeacherSplitError(
                f"{source.role} '{source.name}' ({source.path}) trained on {seen.size} of this run's "
                f"{len(data.val_source_index)} validation images: it was fine-tuned with "
                f"{record.describe()}, this run holds out {mine.describe()}. Model selection on those "
                f"images would be biased. Use the teachers' split (experiment.dataset.split_seed="
                f"{record.split_seed} and experiment.dataset.val_split={record.val_split:g} or smaller), "
                "or fine-tune the teachers again with this run's split.")
    for text in warnings:
        log.warning("teacher split: %s", text)
    return warnings
