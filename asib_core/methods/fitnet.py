"""FitNet (Romero et al., ICLR 2015), RepDistiller's one-stage variant.

Loss::

    ce_alpha * CE + kd_alpha * kd_ramp * KD_T (only when kd_alpha != 0)
  + hint_beta * mean((reg(f_s[h]) - f_t[h])^2)                         ("hint")

``h = hint_layer``: a key of the feature dict (``feat_4d_layer{i}``, ``preact_4d_layer{i}``
or ``feat_4d``), the same key on the student and on teacher ``kd_teacher_index``.
``reg`` is RepDistiller's ConvReg chosen by spatial size (stride-2 3x3 conv if the student
map is 2x larger, transposed 4x4 stride-2 conv if 2x smaller, else a ``1 + Hs - Ht`` kernel
conv), then BatchNorm and ReLU; it is trained with the student (one stage, no separate hint
pre-training). Reference weight: hint_beta 100, CE 1.

``train/hint_floor`` = ``mean(min(f_t[h], 0)^2)``, the part of the hint MSE that the ReLU'd
regressor can never remove; the run warns once when it is over a quarter of the target's
mean square (a pre-activation stage output, e.g. a WRN teacher's ``feat_4d_layer2``).
"""
from __future__ import annotations

import logging

from asib_core.config.errors import ConfigError
from asib_core.losses import fitnet_loss, nonnegative_fit_floor

from ._baseline_kd import BaselineDistiller, conv_regressor, model_device, probe_shapes
from asib_core.contract import Batch, TrainContext
from .registry import register_method

log = logging.getLogger(__name__)

#: share of the hint target's energy in negative entries above which the run warns (once)
NEGATIVE_SHARE_WARNING = 0.25


@register_method("fitnet")
class FitNet(BaselineDistiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.hint_layer = str(cfg.get("hint_layer", "feat_4d_layer2"))
        self.hint_beta = float(cfg.get("hint_beta", 100.0))
        s_shapes = probe_shapes(self.student)
        t_shapes = probe_shapes(self.feature_teacher)
        for role, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            shape = shapes.get(self.hint_layer)
            if shape is None or len(shape) != 4:
                maps = sorted(k for k, v in shapes.items() if len(v) == 4)
                raise ConfigError(
                    f"hint_layer='{self.hint_layer}' is not a 4-D feature map of the {role} "
                    f"(available: {', '.join(maps)}); set hint_layer to one of them."
                )
        self.student_hint_shape = s_shapes[self.hint_layer]
        self.teacher_hint_shape = t_shapes[self.hint_layer]
        self.regressor = conv_regressor(self.student_hint_shape, self.teacher_hint_shape, relu=True)
        self.regressor.to(model_device(self.student))
        self._floor_checked = False

    def auxiliary_modules(self):
        return [self.regressor]

    def forward_train(self, batch: Batch, ctx: TrainContext):
        out = self.student(batch.x)
        logits = out["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        target = outs[self.feature_teacher_index][self.hint_layer]
        hint = fitnet_loss(self.regressor(out[self.hint_layer]), target)
        losses["hint"] = self.hint_beta * hint
        floor = float(nonnegative_fit_floor(target))
        self.record(hint_mse=float(hint.detach()), hint_floor=floor)
        if not self._floor_checked:
            self._floor_checked = True
            self._warn_unreachable_target(floor, float(target.detach().float().pow(2).mean()))
        return logits, losses

    def _warn_unreachable_target(self, floor: float, mean_square: float) -> None:
        """Once per run: the hint target lies largely below 0, where the regressor's final ReLU
        cannot follow it (``train/hint_floor`` is the MSE it can never get under)."""
        if mean_square <= 0 or floor / mean_square <= NEGATIVE_SHARE_WARNING:
            return
        name = getattr(self.feature_teacher, "model_name", "the teacher")
        log.warning(
            "FitNet: %.0f%% of the hint target's energy (teacher %s, hint_layer=%s) is in negative "
            "entries, which the regressor's final ReLU (RepDistiller's ConvReg) cannot produce: the "
            "hint MSE cannot fall below %.3f of its %.3f (logged as train/hint_floor), and at "
            "hint_beta=%g that part of the term trains nothing. Pre-activation networks (e.g. WRN) "
            "do not ReLU their stage outputs; a hint layer or teacher whose map is post-ReLU gives "
            "the hint something to match.",
            100 * floor / mean_square, name, self.hint_layer, floor, mean_square, self.hint_beta)
