"""AB, knowledge transfer via activation boundaries (Heo et al., AAAI 2019), RepDistiller's variant.

Two stages (teacher ``kd_teacher_index``):

1. ``pretrain`` (logged under ``ab_pretrain/``): the student's stem and stages and the
   connectors are trained with the AB loss only::

       feature_weight * 3/1000 * sum_l 2^(l - n + 1) * sum_{c,h,w} ab(r_l(s_l), t_l) / B   ("ab")

   where ``s_l``/``t_l`` are the student/teacher pre-activation maps of stage ``l``
   (``preact_4d_layer{i}``, paired aligned at the deepest stage), ``r_l`` a connector by
   RepDistiller's rule (models/util.py, ``Connector._make_conenctors``): none (identity) when
   the student and teacher maps have the same channels and height, else its ConvReg without
   ReLU (conv chosen by spatial size, then BN),
   ``ab(s, t) = (s + m)^2 [s > -m, t <= 0] + (s - m)^2 [s <= m, t > 0]``, margin m = 1.
   Length: ``min(30, max(1, total_student_epochs // 8))`` epochs (the reference's 30
   epochs before a 240-epoch run), own optimiser (the student's kind, ``student_lr``,
   ``student_weight_decay``, constant LR).
2. the student epochs (the paper: CE + KD; the connectors are no longer used)::

       ce_alpha * CE + kd_alpha * kd_ramp * KD_T (kd_alpha != 0)
     + attention_weight * sum_l AT(f_s^l, f_t^l)                            ("at", omitted when 0)

   ``attention_weight`` is **not part of the paper**: as for ReviewKD it weights an
   attention-transfer term (``at_loss``, p = 2, mean-normalised as in the ``at`` method) on
   the same stage pairs, taken after the activation (``feat_4d_layer{i}``). AT's reference
   weight is 1000, so the seed's 1.0 makes it a very weak term; 0 gives the paper's AB.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from asib_core.losses import ab_loss, at_loss

from ._baseline_kd import (
    BaselineDistiller,
    backbone_parameters,
    conv_regressor,
    model_device,
    pair_stages,
    pretrain_epochs,
    pretrain_optimizer,
    probe_shapes,
    stage_keys,
    total_student_epochs,
)
from asib_core.contract import Batch, TrainContext
from .registry import register_method

log = logging.getLogger(__name__)
AB_MARGIN = 1.0
AB_SCALE = 3.0 / 1000.0


def connector(s_shape, t_shape) -> nn.Module:
    """RepDistiller's AB connector: identity when the maps agree in channels and height
    (``s[1] == t[1] and s[2] == t[2]``), else ConvReg without ReLU."""
    if s_shape[1] == t_shape[1] and s_shape[2] == t_shape[2]:
        return nn.Identity()
    return conv_regressor(s_shape, t_shape, relu=False)


@register_method("ab")
class AB(BaselineDistiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.feature_weight = float(cfg.get("feature_weight", 1.0))      # stage-1 AB weight
        self.attention_weight = float(cfg.get("attention_weight", 0.0))  # stage-2 AT weight
        # stage 2 reads teacher features only for the optional AT term
        self.uses_feature_teacher = self.attention_weight != 0.0
        s_shapes = probe_shapes(self.student)
        t_shapes = probe_shapes(self.feature_teacher)
        self.pairs = pair_stages(stage_keys(s_shapes, "preact_4d_layer"),
                                 stage_keys(t_shapes, "preact_4d_layer"))
        self.at_pairs = [(s_key.replace("preact_", "feat_"), t_key.replace("preact_", "feat_"))
                         for s_key, t_key in self.pairs]
        self.connectors = nn.ModuleList(
            connector(s_shapes[s_key], t_shapes[t_key]) for s_key, t_key in self.pairs
        ).to(model_device(self.student))
        self.pretrain_epochs_run = 0

    def auxiliary_modules(self):
        return []  # the connectors are trained in the first stage only

    def teachers_used(self) -> list[int]:
        """Stage 1 reads the feature teacher even when stage 2 runs no teacher."""
        first = {self.feature_teacher_index} if self.feature_weight != 0.0 else set()
        return sorted(first | set(self.needed_teachers()))

    def ab_term(self, s_out: dict, t_out: dict) -> tuple[torch.Tensor, float]:
        """Unweighted multi-layer AB loss and the fraction of neurons on the teacher's side."""
        n = len(self.pairs)
        terms, agree = [], []
        for i, ((s_key, t_key), connector) in enumerate(zip(self.pairs, self.connectors)):
            s, t = connector(s_out[s_key]), t_out[t_key]
            terms.append((2.0 ** (i - n + 1)) * ab_loss(s, t, AB_MARGIN))
            agree.append(((s.detach() > 0) == (t > 0)).float().mean())
        return AB_SCALE * torch.stack(terms).sum(), float(torch.stack(agree).mean())

    # -- stage 1 ----------------------------------------------------------------
    def pretrain(self, runner) -> None:
        epochs = pretrain_epochs(total_student_epochs(runner))
        if epochs == 0 or self.feature_weight == 0.0:
            log.info("AB pre-training skipped (epochs=%d, feature_weight=%g)", epochs, self.feature_weight)
            return
        params = backbone_parameters(self.student) + [p for p in self.connectors.parameters() if p.requires_grad]
        optimizer = pretrain_optimizer(runner.cfg, params)
        teacher = self.feature_teacher

        def step(batch: Batch, epoch: int):
            s_out = self.student(batch.x)
            with torch.no_grad():
                t_out = teacher(batch.x)
            ab, agree = self.ab_term(s_out, t_out)
            self.record(agree=agree)
            return s_out["logit"], {"ab": self.feature_weight * ab}

        self.train()
        runner.run_aux_epochs("ab_pretrain", step, params, optimizer, epochs)
        self.pretrain_epochs_run = epochs

    # -- stage 2 ----------------------------------------------------------------
    def forward_train(self, batch: Batch, ctx: TrainContext):
        out = self.student(batch.x)
        logits = out["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        if self.attention_weight != 0.0:
            t_out = outs[self.feature_teacher_index]
            at_sum = sum(at_loss(out[s_key], t_out[t_key]) for s_key, t_key in self.at_pairs)
            losses["at"] = self.attention_weight * at_sum
            self.record(at_raw=float(at_sum.detach()))
        return logits, losses
