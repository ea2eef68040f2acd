"""Issue 15 item 7: the quickstart (`main`'s embedded default) shows distillation working because
of its shape: the teachers fine-tune on the whole digits training split, the students (the KD
one and its CE-only baseline) on a small labelled subset of it, with the same validation
hold-out. No training here: the effective configs and the data they build."""
from __future__ import annotations

import numpy as np

from asib_core.config import resolve_experiment
from asib_core.data import build_data
from asib_core.pipeline.finetune import finetune_config

PER_CLASS = 10


def test_quickstart_students_see_a_labelled_subset_of_what_the_teachers_train_on():
    kd = resolve_experiment("quickstart").cfg
    ce = resolve_experiment("quickstart", ["method=ce"]).cfg     # main's baseline_ce variant
    assert kd["method_name"] == "vanilla_kd" and ce["method_name"] == "ce"
    assert kd["dataset"] == ce["dataset"] and kd["dataset"]["train_per_class"] == PER_CLASS
    student = build_data(kd)
    labels = np.concatenate([yb.numpy() for _, yb, _ in student.loader("train", augment=False, drop_last=False)])
    assert np.bincount(labels, minlength=10).tolist() == [PER_CLASS] * 10
    assert student.loader("train").batch_size == kd["dataset"]["batch_size"] < len(labels)
    for role in ("teacher1", "teacher2"):
        ft = finetune_config(kd[role]["name"], kd["dataset"]["name"], [])   # the recipe main fine-tunes
        assert ft["dataset"]["train_per_class"] is None, role
        teacher = build_data(ft)
        # the whole training split less the same validation hold-out: the students' images are
        # among the teachers', and no teacher saw a student's validation image
        assert len(teacher.train) > 10 * len(student.train)
        assert np.array_equal(np.sort(teacher.val_source_index), np.sort(student.val_source_index))
        assert set(student.train_source_index.tolist()) < set(teacher.train_source_index.tolist())
