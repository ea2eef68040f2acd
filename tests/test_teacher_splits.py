"""Issue 12 item 2: teacher split identity.

A teacher checkpoint records the data it was trained on (dataset, content fingerprint of the
official training split, validation fraction, split seed, train_per_class, class subset), and
a student run whose validation split contains an image its teachers trained on refuses to
start, naming the teacher and the mismatch.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from asib_core.data import build_data
from asib_core.data.identity import SplitRecord, content_fingerprint, split_indices, trained_indices
from asib_core.pipeline.teacher_splits import TeacherSplitError, check_teacher_splits, split_record_of
from asib_core.pipeline.teachers import TeacherSource

from tests.pipeline_helpers import TINY_DISTILL, run_module

DIGITS = {"seed": 3, "dataset": {"name": "digits", "val_split": 0.2, "split_seed": 42, "batch_size": 32}}


def test_split_record_reproduces_the_bundles_split():
    data = build_data({**DIGITS, "dataset": {**DIGITS["dataset"], "train_per_class": 30}})
    rec = data.split_record
    assert (rec.dataset, rec.val_split, rec.split_seed, rec.train_per_class) == ("digits", 0.2, 42, 30)
    assert rec.n_source == len(data.source_labels) and len(data.train) == 30 * 10
    train_idx, val_idx = split_indices(data.source_labels, 0.2, 42, 30)
    assert np.array_equal(train_idx, data.train_source_index)
    assert np.array_equal(val_idx, data.val_source_index)
    assert np.array_equal(data.source_labels[train_idx], data.train.labels)
    assert np.array_equal(trained_indices(rec, data.source_labels), train_idx)
    # a class subset (overlap teacher) keeps only its classes' training images
    sub = trained_indices(rec.with_classes([1, 3]), data.source_labels)
    assert set(np.unique(data.source_labels[sub])) == {1, 3} and len(sub) == 60


def test_split_seed_is_fixed_by_default_and_independent_of_the_run_seed():
    a = build_data({"seed": 0, "dataset": {"name": "digits"}})
    b = build_data({"seed": 1, "dataset": {"name": "digits"}})
    assert a.split_record.split_seed == 42 == b.split_record.split_seed
    assert np.array_equal(a.val_source_index, b.val_source_index)
    c = build_data({"seed": 1, "dataset": {"name": "digits", "split_seed": None}})
    assert c.split_record.split_seed == 1 and not np.array_equal(a.val_source_index, c.val_source_index)


def test_smaller_validation_fraction_with_the_same_seed_is_nested():
    labels = np.repeat(np.arange(10), 57)
    _, big = split_indices(labels, 0.2, 5)
    _, small = split_indices(labels, 0.1, 5)
    assert set(small) < set(big)


def test_content_fingerprint_changes_with_one_pixel_or_one_label():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 20)
    base = content_fingerprint(images, labels)
    assert base == content_fingerprint(images.copy(), labels.copy())
    pixel = images.copy()
    pixel[7, 3, 3, 1] ^= 1
    label = labels.copy()
    label[0] = (label[0] + 1) % 3
    assert len({base, content_fingerprint(pixel, labels), content_fingerprint(images, label)}) == 3


def _teacher(record: dict | None):
    """A (source, checkpoint meta) pair of a resnet20 teacher with that split record."""
    meta = {"teacher": "resnet20"} if record is None else {"teacher": "resnet20", "data": record}
    return TeacherSource("teacher1", "resnet20", "t.pth", None), meta


def check(data, *teachers):
    return check_teacher_splits(data, [t[0] for t in teachers], [t[1] for t in teachers])


def test_check_refuses_an_overlap_and_accepts_the_same_or_a_nested_split():
    data = build_data(DIGITS)
    rec = data.split_record.as_dict()
    assert split_record_of(_teacher(rec)[1]) == data.split_record
    assert check(data, _teacher(rec)) == []
    larger_val = {**rec, "val_split": 0.3}   # the teacher held out more: it never saw our val images
    assert check(data, _teacher(larger_val)) == []
    with pytest.raises(TeacherSplitError, match=r"teacher1 'resnet20'.*split_seed=7"):
        check(data, _teacher({**rec, "split_seed": 7}))
    with pytest.raises(TeacherSplitError, match="val_split=0.1"):
        check(data, _teacher({**rec, "val_split": 0.1}))


def test_unrecorded_or_foreign_teachers_are_warned_about_not_refused():
    data = build_data(DIGITS)
    other = {**data.split_record.as_dict(), "source_fingerprint": "0" * 64}
    notes = check(data, _teacher(None), _teacher(other))
    assert len(notes) == 2 and "records no training split" in notes[0] and "other data" in notes[1]
    assert split_record_of({"data": {"dataset": "digits"}}) is None  # malformed: no record


@pytest.mark.slow
def test_student_run_refuses_a_teacher_trained_on_its_validation_split(workdir):
    """End to end on digits: teachers fine-tuned with split seed 7 -> a student run on the
    default split (42) refuses (the CLI exits 2 naming the teacher); with the teachers' split
    it runs."""
    from asib_core.pipeline.distill import run_distill
    from asib_core.pipeline.finetune import run_finetune

    for teacher in ("resnet20", "wrn_16_2"):
        run_finetune(teacher, "digits", ["finetune_epochs=1", "dataset.train_per_class=10", "dataset.split_seed=7"])
    record = split_record_of(torch.load(workdir / "checkpoints/teachers/resnet20_digits.pth",
                                        weights_only=True)["meta"])
    assert (record.dataset, record.split_seed, record.train_per_class, record.val_split) == ("digits", 7, 10, 0.15)

    args = [*TINY_DISTILL, "experiment.student_epochs_per_stage=[1]"]
    with pytest.raises(TeacherSplitError, match=r"teacher1 'resnet20'.*split_seed=7"):
        run_distill("quickstart", args)
    refused = run_module("pipelines.distill", ["exp=quickstart", *args], workdir)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
    assert "teacher1 'resnet20'" in refused.stderr and "split_seed=7" in refused.stderr
    assert run_distill("quickstart", [*args, "experiment.dataset.split_seed=7"]).run_id
