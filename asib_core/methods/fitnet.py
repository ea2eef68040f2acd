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
"""
from __future__ import annotations

from asib_core.config.errors import ConfigError
from asib_core.losses import fitnet_loss

from ._baseline_kd import BaselineDistiller, conv_regressor, model_device, probe_shapes
from asib_core.contract import Batch, TrainContext
from .registry import register_method


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

    def auxiliary_modules(self):
        return [self.regressor]

    def forward_train(self, batch: Batch, ctx: TrainContext):
        out = self.student(batch.x)
        logits = out["logit"]
        outs = self.teacher_forward(batch.x)
        losses = self.ce_kd_losses(batch, logits, outs, ctx)
        hint = fitnet_loss(self.regressor(out[self.hint_layer]), outs[self.feature_teacher_index][self.hint_layer])
        losses["hint"] = self.hint_beta * hint
        self.record(hint_mse=float(hint.detach()))
        return logits, losses
