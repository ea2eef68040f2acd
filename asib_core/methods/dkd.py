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

Warm-up ``w_dkd``: DKD's own ``min(epoch / W, 1)`` with mdistiller's 1-based epochs
(mdistiller/distillers/DKD.py), i.e. ``min((ctx.epoch + 1) / W, 1)``, from its own key
``dkd_warmup_epochs`` (null: the paper's 20), which is given in epochs of the paper's
240-epoch schedule and kept as the same share of this run:
``W = max(1, ceil(dkd_warmup_epochs * total_epochs / 240))`` (20 -> 3 of a 30-epoch run);
0 switches the warm-up off. ``kd_warmup_epochs`` (the engine's ramp of the optional KD term)
does not touch it. The paper's recipe is ``recipe=dkd_paper`` (configs/recipe/dkd_paper.yaml).
"""
from __future__ import annotations

import torch

from asib_core.engine.schedules import linear_warmup, scaled_warmup_epochs
from asib_core.losses import dkd_loss

from ._baseline_kd import BaselineDistiller
from asib_core.contract import Batch, TrainContext
from .registry import register_method

#: DKD paper's warm-up length (epochs of its 240-epoch schedule), used when dkd_warmup_epochs is null
DKD_PAPER_WARMUP_EPOCHS = 20


@register_method("dkd")
class DKD(BaselineDistiller):
    uses_feature_teacher = False
    needs_logit_target = True

    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.dkd_alpha = float(cfg.get("dkd_alpha", 1.0))
        self.dkd_beta = float(cfg.get("dkd_beta", 8.0))
        warm = cfg.get("dkd_warmup_epochs")
        self.reference_warmup = DKD_PAPER_WARMUP_EPOCHS if warm is None else int(warm)

    def warmup_epochs(self, total_epochs: int) -> int:
        """``W`` of a run of ``total_epochs`` student epochs (0 = no warm-up)."""
        return scaled_warmup_epochs(self.reference_warmup, total_epochs)

    def dkd_warmup(self, epoch: int, total_epochs: int) -> float:
        """``min((epoch + 1) / W, 1)`` for the 0-based global student epoch."""
        return linear_warmup(epoch, self.warmup_epochs(total_epochs))

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
        warm = self.dkd_warmup(ctx.epoch, ctx.total_epochs)
        losses["dkd"] = warm * total
        self.record(dkd_tckd=float(tckd.detach()), dkd_nckd=float(nckd.detach()), dkd_warmup=warm)
        return logits, losses


__all__ = ["DKD", "DKD_PAPER_WARMUP_EPOCHS"]
