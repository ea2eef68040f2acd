"""AT, attention transfer (Zagoruyko & Komodakis, ICLR 2017), RepDistiller's variant.

Loss::

    ce_alpha * CE + kd_alpha * kd_ramp * KD_T (only when kd_alpha != 0)
  + at_beta * sum_l mean_{b,j} (at(f_s^l)_bj - at(f_t^l)_bj)^2            ("at")

with ``at(f) = l2_normalize(flatten(mean_c f^2))`` (p = 2) and ``l`` over the stage outputs
``feat_4d_layer{i}`` (RepDistiller's ``feat[1:-1]``: every stage, not the stem, not the
pooled vector), student stage paired with teacher stage (aligned at the deepest stage when
the counts differ); the larger map is average-pooled to the smaller. Teacher
``kd_teacher_index``.

Normalisation: the per-layer term is the mean over batch and positions, exactly the
official AT code's and RepDistiller's ``(at(s) - at(t)).pow(2).mean()``, for which the
reference weight is 1000 (kd-reference.md). The attention vectors have unit norm, so a
layer's term is ``||a_s - a_t||^2 / (H W) <= 4 / (H W)``: about 1e-3 on CIFAR maps, i.e.
``at_beta = 1000`` gives an AT term of the order of the CE. The seed's ``at_beta: 0.1``
(a value upstream never read) makes the term ~1e-4, i.e. AT practically off; we apply
the configured value as given and warn.
"""
from __future__ import annotations

import logging

from asib_core.losses import at_loss

from ._baseline_kd import BaselineDistiller, pair_stages, probe_shapes, stage_keys
from asib_core.contract import Batch, TrainContext
from .registry import register_method

log = logging.getLogger(__name__)
AT_P = 2
AT_REFERENCE_BETA = 1000.0


@register_method("at")
class AT(BaselineDistiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.at_beta = float(cfg.get("at_beta", AT_REFERENCE_BETA))
        s_keys = stage_keys(probe_shapes(self.student))
        t_keys = stage_keys(probe_shapes(self.feature_teacher))
        self.pairs = pair_stages(s_keys, t_keys)
        if 0 < self.at_beta < 1.0:
            log.warning("at_beta=%g: with the mean-normalised AT loss the reference weight is %g; "
                        "this value makes the AT term about %g times weaker (practically off).",
                        self.at_beta, AT_REFERENCE_BETA, AT_REFERENCE_BETA / self.at_beta)

    def forward_train(self, batch: Batch, ctx: TrainContext):
        out = self.student(batch.x)
        logits = out["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        t_out = outs[self.feature_teacher_index]
        terms = [at_loss(out[s_key], t_out[t_key], p=AT_P) for s_key, t_key in self.pairs]
        at_sum = sum(terms)
        losses["at"] = self.at_beta * at_sum
        self.record(**{f"at_{s_key.replace('feat_4d_', '')}": float(t.detach())
                       for (s_key, _), t in zip(self.pairs, terms)})
        return logits, losses
