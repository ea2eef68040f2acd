"""FT, factor transfer (Kim, Park, Kwak, NeurIPS 2018), RepDistiller's variant.

Two stages (teacher ``kd_teacher_index``, ``f_t`` its last map ``feat_4d``):

1. ``pretrain`` (logged under ``ft_pretrain/``): the paraphraser, a convolutional
   auto-encoder with rate k = 0.5 (encoder: three 3x3 convs ``C -> C -> kC -> kC`` with
   LeakyReLU(0.1); decoder: three 3x3 transposed convs back to ``C``; no BatchNorm, as in
   RepDistiller), learns to reconstruct ``f_t``::

       feature_weight * mean((dec(enc(f_t)) - f_t)^2)                             ("recon")

   for ``min(30, max(1, total_student_epochs // 8))`` epochs (the reference's 30 before a
   240-epoch run) with its own optimiser (the student's kind, ``student_lr``,
   ``student_weight_decay``, constant LR). It is then frozen.
2. the student epochs, with a translator (three 3x3 conv + BN + LeakyReLU(0.1) layers,
   ``C_s -> C_s -> kC_t -> kC_t``) on the student's last map ``feat_4d``::

       ce_alpha * CE + kd_alpha * kd_ramp * KD_T (kd_alpha != 0)
     + factor_weight * mean_{b,j} | F(trans(f_s))_bj - F(enc(f_t))_bj |              ("ft")

   ``F(x) = l2n(flatten(mean_c x^2))`` per sample, RepDistiller's factor with its defaults
   p1 = 2, p2 = 1 (distiller_zoo/FT.py, ``FactorTransfer.factor``:
   ``F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))``; loss
   ``(factor(f_s) - factor(f_t)).abs().mean()``), the form kd-reference.md quotes. (The FT
   paper normalises the whole flattened factor instead: ``ft_factor(mode="flatten")``.) If
   the student and teacher maps differ in size the larger factor is average-pooled to the
   smaller first, as in RepDistiller. The reference weight 200 (``-b 200`` in RepDistiller's
   scripts/run_cifar_distill.sh) belongs to exactly this normalisation; the seed's
   ``factor_weight: 1.0`` is 200x weaker. The paper recipe is ``recipe=ft_paper``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.losses import ft_loss

from ._baseline_kd import (
    BaselineDistiller,
    match_spatial,
    model_device,
    pretrain_epochs,
    pretrain_optimizer,
    probe_shapes,
    total_student_epochs,
)
from asib_core.contract import Batch, TrainContext
from .registry import register_method

log = logging.getLogger(__name__)
FT_RATE = 0.5
FT_P = 1
#: RepDistiller's factor normalisation (``F(f) = l2n(mean_c f^2)``)
FT_FACTOR_MODE = "channel_mean_square"


def _conv_block(cin: int, cout: int, bn: bool, transpose: bool = False) -> list[nn.Module]:
    conv = (nn.ConvTranspose2d if transpose else nn.Conv2d)(cin, cout, kernel_size=3, stride=1, padding=1)
    return [conv] + ([nn.BatchNorm2d(cout)] if bn else []) + [nn.LeakyReLU(0.1)]


class Paraphraser(nn.Module):
    """Teacher-side auto-encoder; ``encoder(f_t)`` is the teacher factor."""

    def __init__(self, channels: int, rate: float = FT_RATE, use_bn: bool = False):
        super().__init__()
        factor = max(1, int(channels * rate))
        self.factor_channels = factor
        self.encoder = nn.Sequential(*_conv_block(channels, channels, use_bn),
                                     *_conv_block(channels, factor, use_bn),
                                     *_conv_block(factor, factor, use_bn))
        self.decoder = nn.Sequential(*_conv_block(factor, factor, use_bn, transpose=True),
                                     *_conv_block(factor, channels, use_bn, transpose=True),
                                     *_conv_block(channels, channels, use_bn, transpose=True))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Student-side encoder to the paraphraser's factor width."""

    def __init__(self, in_channels: int, factor_channels: int, use_bn: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(*_conv_block(in_channels, in_channels, use_bn),
                                     *_conv_block(in_channels, factor_channels, use_bn),
                                     *_conv_block(factor_channels, factor_channels, use_bn))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


@register_method("ft")
class FT(BaselineDistiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.factor_weight = float(cfg.get("factor_weight", 200.0))   # stage-2 FT weight
        self.feature_weight = float(cfg.get("feature_weight", 1.0))   # stage-1 reconstruction weight
        self.student_shape = probe_shapes(self.student)["feat_4d"]
        self.teacher_shape = probe_shapes(self.feature_teacher)["feat_4d"]
        device = model_device(self.student)
        self.paraphraser = Paraphraser(self.teacher_shape[1], FT_RATE, use_bn=False).to(device)
        self.translator = Translator(self.student_shape[1], self.paraphraser.factor_channels).to(device)
        self.paraphraser.requires_grad_(False)  # trained only in pretrain()
        self._pretraining = False
        self.pretrain_epochs_run = 0

    def train(self, mode: bool = True):
        super().train(mode)
        self.paraphraser.train(mode and getattr(self, "_pretraining", False))  # frozen after its own stage
        return self

    def auxiliary_modules(self):
        return [self.translator]

    # -- stage 1 ----------------------------------------------------------------
    def pretrain(self, runner) -> None:
        epochs = pretrain_epochs(total_student_epochs(runner))
        if epochs == 0 or self.feature_weight == 0.0:
            log.warning("FT paraphraser pre-training skipped (epochs=%d, feature_weight=%g): the "
                        "teacher factor comes from an untrained paraphraser", epochs, self.feature_weight)
            return
        teacher = self.feature_teacher
        self.paraphraser.requires_grad_(True)
        params = list(self.paraphraser.parameters())
        optimizer = pretrain_optimizer(runner.cfg, params)

        def step(batch: Batch, epoch: int):
            with torch.no_grad():
                t_out = teacher(batch.x)
            f_t = t_out["feat_4d"].float()
            _, rec = self.paraphraser(f_t)
            mse = F.mse_loss(rec.float(), f_t)
            return t_out["logit"], {"recon": self.feature_weight * mse}

        self._pretraining = True
        try:
            self.train()
            runner.run_aux_epochs("ft_pretrain", step, params, optimizer, epochs)
        finally:
            self._pretraining = False
            self.paraphraser.requires_grad_(False)
            self.train()
        self.pretrain_epochs_run = epochs

    # -- stage 2 ----------------------------------------------------------------
    def forward_train(self, batch: Batch, ctx: TrainContext):
        out = self.student(batch.x)
        logits = out["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(outs[self.feature_teacher_index]["feat_4d"])
        factor_s = self.translator(out["feat_4d"])
        factor_s, factor_t = match_spatial(factor_s, factor_t)
        ft = ft_loss(factor_s, factor_t, p=FT_P, mode=FT_FACTOR_MODE)
        losses["ft"] = self.factor_weight * ft
        self.record(ft_l1=float(ft.detach()))
        return logits, losses
