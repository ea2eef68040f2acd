"""DKD, decoupled knowledge distillation (Zhao et al., CVPR 2022).

Loss (per batch, ``T = ctx.tau``, ``y`` the label)::

    ce_alpha * CE
  + kd_alpha * kd_ramp * T^2 KL(q || p)                      (only when kd_alpha != 0)
  + w_dkd(epoch) * (dkd_alpha * TCKD + dkd_beta * NCKD)       ("dkd")

``q`` is the ``kd_target`` distribution (teacher ``kd_teacher_index`` or the weighted
average of the teachers, at temperature T); TCKD/NCKD are computed from it exactly as
from teacher logits (``T * log q`` is passed as the teacher logits, so ``softmax`` of
``T log q / T`` gives back ``q``). With Mixup/CutMix the DKD term is
``lam * DKD(y_a) + (1 - lam) * DKD(y_b)``.

Warm-up ``w_dkd``: DKD's own ``min(epoch / W, 1)`` with 1-based epochs, i.e.
``min((ctx.epoch + 1) / W, 1)``; ``W = kd_warmup_epochs`` when that key is > 0 (then
``w_dkd == ctx.kd_ramp``), else the paper's ``W = 20``. The paper's recipe is
``kd_alpha: 0, ce_alpha: 1, dkd_alpha: 1, dkd_beta: 8, tau: 4, kd_warmup_epochs: 20``.
"""
from __future__ import annotations

import torch

from asib_core.losses import dkd_loss

from ._baseline_kd import BaselineDistiller
from asib_core.contract import Batch, TrainContext
from .registry import register_method

#: DKD paper's warm-up length (epochs) used when kd_warmup_epochs is 0 / unset
DKD_PAPER_WARMUP_EPOCHS = 20


@register_method("dkd")
class DKD(BaselineDistiller):
    uses_feature_teacher = False
    needs_logit_target = True

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.dkd_alpha = float(cfg.get("dkd_alpha", 1.0))
        self.dkd_beta = float(cfg.get("dkd_beta", 8.0))
        warm = int(cfg.get("kd_warmup_epochs") or 0)
        self.warmup_epochs = warm if warm > 0 else DKD_PAPER_WARMUP_EPOCHS

    def dkd_warmup(self, epoch: int) -> float:
        """``min((epoch + 1) / W, 1)`` for the 0-based global student epoch."""
        return min(1.0, (epoch + 1) / self.warmup_epochs)

    def forward_train(self, batch: Batch, ctx: TrainContext):
        logits = self.student(batch.x)["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        target = self.logit_target(outs, ctx.tau)
        # teacher-equivalent logits of the target distribution (exact: softmax(log q) = q)
        target_logits = ctx.tau * torch.log(target.clamp_min(torch.finfo(target.dtype).tiny))

        def parts(y):
            return dkd_loss(logits, target_logits, y, alpha=self.dkd_alpha, beta=self.dkd_beta,
                            temperature=ctx.tau, return_parts=True)

        total, tckd, nckd = parts(batch.y)
        if batch.y_b is not None and batch.lam < 1.0:
            total_b, tckd_b, nckd_b = parts(batch.y_b)
            lam = float(batch.lam)
            total = lam * total + (1.0 - lam) * total_b
            tckd = lam * tckd + (1.0 - lam) * tckd_b
            nckd = lam * nckd + (1.0 - lam) * nckd_b
        warm = self.dkd_warmup(ctx.epoch)
        losses["dkd"] = warm * total
        self.record(dkd_tckd=float(tckd.detach()), dkd_nckd=float(nckd.detach()), dkd_warmup=warm)
        return logits, losses


__all__ = ["DKD", "DKD_PAPER_WARMUP_EPOCHS"]
