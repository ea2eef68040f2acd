"""Vanilla KD (Hinton et al., 2015): ce_alpha * CE + kd_alpha * T^2 KL(p_t^T || p_s^T).

With two teachers the target follows ``kd_target`` (``teacher`` = teacher
``kd_teacher_index``; ``avg`` = the ``teacher_weights``-weighted mean of the softened
teacher distributions). Only the teachers the target needs are run.
"""
from __future__ import annotations

from ._baseline_kd import BaselineDistiller
from asib_core.contract import Batch, TrainContext
from .registry import register_method


@register_method("vanilla_kd")
class VanillaKD(BaselineDistiller):
    uses_feature_teacher = False

    def forward_train(self, batch: Batch, ctx: TrainContext):
        logits = self.student(batch.x)["logit"]
        outs = self.teacher_forward(batch.x) if self.kd_alpha != 0.0 else {}
        return logits, self.ce_kd_losses(batch, logits, outs, ctx)
