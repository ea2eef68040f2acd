"""Vanilla KD (Hinton et al., 2015): ce_alpha * CE + kd_alpha * T^2 KL(p_t^T || p_s^T)."""
from __future__ import annotations

from asib_core.losses import soft_target_kd_loss

from .base import Batch, Distiller, TrainContext
from .registry import register_method
from .targets import target_probs


@register_method("vanilla_kd")
class VanillaKD(Distiller):
    def forward_train(self, batch: Batch, ctx: TrainContext):
        logits = self.student(batch.x)["logit"]
        teacher_logits = [out["logit"] for out in self.teacher_outputs(batch.x)]
        target = target_probs(self.cfg, teacher_logits, ctx.tau)
        kd = soft_target_kd_loss(logits, target, ctx.tau)
        return logits, {
            "ce": self.ce_alpha * batch.ce(logits, self.label_smoothing),
            "kd": self.kd_alpha * ctx.kd_ramp * kd,
        }
