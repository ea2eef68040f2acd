"""Shared plumbing of the classic KD baselines (dkd, fitnet, at, ab, ft).

Private module (leading underscore: the registry's auto-import skips it). It holds

* :class:`BaselineDistiller`: the RepDistiller loss convention
  ``ce_alpha * CE + kd_alpha * kd_ramp * KD_tau(student <- kd_target)`` plus the
  method's own weighted term, the choice of teachers (feature terms use teacher
  ``kd_teacher_index``; the logit term follows ``kd_target``) and a teacher forward that
  skips teachers no term needs;
* :func:`probe_shapes`: the feature-dict shapes of a model on a ``1x3x32x32`` zero input
  (how auxiliary modules get their sizes at ``__init__``);
* :func:`conv_regressor`: RepDistiller's ``ConvReg`` (FitNet regressor, AB connector);
* :func:`pretrain_epochs` / :func:`pretrain_optimizer`: the first stage of two-stage
  methods (AB, FT).
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.config.errors import ConfigError
from asib_core.engine.optim import build_optimizer
from asib_core.losses import soft_target_kd_loss

from asib_core.contract import Batch, Distiller, TrainContext
from .targets import LOGIT_TARGETS, selected_teacher, target_probs

log = logging.getLogger(__name__)

#: input used to infer feature shapes at construction (every dataset here is 32x32 RGB)
PROBE_INPUT_SHAPE = (1, 3, 32, 32)
#: reference length of the first stage of AB / FT (kd-reference.md) and its share of the
#: reference 240-epoch schedule
PRETRAIN_MAX_EPOCHS = 30
PRETRAIN_FRACTION_DIVISOR = 8


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def probe_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of ``model``'s output dict on a ``1x3x32x32`` zero tensor.

    Runs under ``torch.no_grad()`` in eval mode (so BatchNorm running stats are not
    touched) on the model's device and restores the previous train/eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(PROBE_INPUT_SHAPE, device=model_device(model)))
    finally:
        model.train(was_training)
    return {k: tuple(v.shape) for k, v in out.items() if torch.is_tensor(v)}


def stage_keys(shapes: dict, prefix: str = "feat_4d_layer") -> list[str]:
    """``[prefix1, prefix2, ...]`` present in a probed feature dict, in stage order."""
    keys, i = [], 1
    while f"{prefix}{i}" in shapes:
        keys.append(f"{prefix}{i}")
        i += 1
    return keys


def pair_stages(student_keys: list[str], teacher_keys: list[str]) -> list[tuple[str, str]]:
    """Pair stages aligned at the deepest one (equal counts: stage i with stage i)."""
    k = min(len(student_keys), len(teacher_keys))
    if k == 0:
        raise ConfigError("the student or the teacher exposes no per-stage feature maps.")
    return list(zip(student_keys[len(student_keys) - k:], teacher_keys[len(teacher_keys) - k:]))


def conv_regressor(s_shape, t_shape, relu: bool = True) -> nn.Sequential:
    """RepDistiller's ``ConvReg``: maps a student map ``[*, Cs, Hs, Ws]`` to ``[*, Ct, Ht, Wt]``.

    Conv chosen by spatial size: stride-2 3x3 conv if the student map is 2x larger,
    transposed 4x4 stride-2 conv if it is 2x smaller, else a ``(1 + Hs - Ht, 1 + Ws - Wt)``
    kernel conv (a 1x1 conv for equal sizes); then BatchNorm and (``relu``) ReLU.
    A student map smaller than the teacher's but not exactly half (which ConvReg refuses)
    is bilinearly upsampled to the teacher size and followed by a 3x3 conv.
    """
    _, s_c, s_h, s_w = s_shape
    _, t_c, t_h, t_w = t_shape
    if s_h == 2 * t_h and s_w == 2 * t_w:
        layers = [nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)]
    elif 2 * s_h == t_h and 2 * s_w == t_w:
        layers = [nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)]
    elif s_h >= t_h and s_w >= t_w:
        layers = [nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))]
    else:
        layers = [nn.Upsample(size=(t_h, t_w), mode="bilinear", align_corners=False),
                  nn.Conv2d(s_c, t_c, kernel_size=3, padding=1)]
    layers.append(nn.BatchNorm2d(t_c))
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def match_spatial(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool the larger of two 4-D maps to the smaller spatial size."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def total_student_epochs(runner) -> int:
    spec = getattr(runner, "spec", None)
    if spec is not None and hasattr(spec, "total_epochs"):
        return int(spec.total_epochs)
    return int(sum(int(e) for e in (runner.cfg.get("student_epochs_per_stage") or [])))


def pretrain_epochs(total_epochs: int) -> int:
    """Length of the first stage of AB / FT: ``min(30, max(1, total // 8))`` (0 if total is 0).

    The reference runs 30 pre-training epochs before a 240-epoch schedule (1/8 of it);
    shorter runs keep that share, longer ones the reference's 30.
    """
    if total_epochs <= 0:
        return 0
    return min(PRETRAIN_MAX_EPOCHS, max(1, total_epochs // PRETRAIN_FRACTION_DIVISOR))


def pretrain_optimizer(cfg: dict, params: list) -> torch.optim.Optimizer:
    """The first stage's own optimiser: the student's kind, LR and weight decay (constant LR)."""
    return build_optimizer(
        str(cfg.get("optimizer", "adamw")), [{"params": list(params), "name": "pretrain"}],
        lr=float(cfg["student_lr"]), weight_decay=float(cfg.get("student_weight_decay", 0.0) or 0.0),
        momentum=float(cfg.get("b_step_momentum", 0.9)),
        nesterov=bool(cfg.get("b_step_nesterov", True)),
    )


def backbone_parameters(model: nn.Module) -> list:
    """Trainable parameters of the student's stem and stages (no classifier, no adapter)."""
    if hasattr(model, "stage_modules"):
        modules = [m for _, m in model.stage_modules()]
        params = [p for m in modules for p in m.parameters()]
    else:  # pragma: no cover - every registered model is a FeatureModel
        head = {id(p) for p in model.classifier.parameters()}
        params = [p for p in model.parameters() if id(p) not in head]
    return [p for p in params if p.requires_grad]


class BaselineDistiller(Distiller):
    """CE + optional Hinton KD (RepDistiller convention) + the subclass's own term.

    Subclasses set ``uses_feature_teacher`` (True when a feature term reads teacher
    ``kd_teacher_index``) and ``needs_logit_target`` (True when a logit term other than
    the optional KD needs the ``kd_target`` distribution, e.g. DKD).
    """

    uses_feature_teacher = True
    needs_logit_target = False

    def __init__(self, student: nn.Module, teachers: list[nn.Module], cfg: dict):
        super().__init__(student, teachers, cfg)
        if not self.teachers:
            raise ConfigError(f"method '{self.name}' needs at least one teacher (teacher1).")
        self.feature_teacher_index = selected_teacher(cfg, len(self.teachers))
        self.kd_target = str(cfg.get("kd_target", "avg"))
        if self.uses_logit_target() and self.kd_target not in LOGIT_TARGETS:
            raise ConfigError(
                f"kd_target='{self.kd_target}' needs the ASIB method (method=asib); method "
                f"'{self.name}' accepts {', '.join(LOGIT_TARGETS)}."
            )

    # -- which teachers ---------------------------------------------------------
    def uses_logit_target(self) -> bool:
        return self.needs_logit_target or self.kd_alpha != 0.0

    def teachers_used(self) -> list[int]:
        return self.needed_teachers()

    def needed_teachers(self) -> list[int]:
        need = set()
        if self.uses_feature_teacher:
            need.add(self.feature_teacher_index)
        if self.uses_logit_target():
            if len(self.teachers) == 1:
                need.add(0)
            elif self.kd_target == "teacher":
                need.add(self.feature_teacher_index)
            else:
                need.update(range(len(self.teachers)))
        return sorted(need)

    @torch.no_grad()
    def teacher_forward(self, x: torch.Tensor) -> dict[int, dict]:
        """Outputs of the teachers some term needs, keyed by teacher index (no grad)."""
        return {i: self.teachers[i](x) for i in self.needed_teachers()}

    @property
    def feature_teacher(self) -> nn.Module:
        return self.teachers[self.feature_teacher_index]

    # -- loss terms -------------------------------------------------------------
    def logit_target(self, outs: dict[int, dict], tau: float) -> torch.Tensor:
        """``kd_target`` distribution at temperature ``tau`` (teacher / weighted avg)."""
        logits = [outs[i]["logit"].float() if i in outs else None for i in range(len(self.teachers))]
        return target_probs(self.cfg, logits, tau)

    def ce_kd_losses(self, batch: Batch, logits: torch.Tensor, outs: dict[int, dict],
                     ctx: TrainContext) -> dict[str, torch.Tensor]:
        """``{"ce": ce_alpha * CE}`` plus ``"kd": kd_alpha * kd_ramp * KD`` when kd_alpha != 0."""
        losses = {"ce": self.ce_alpha * batch.ce(logits, self.label_smoothing)}
        if self.kd_alpha != 0.0:
            target = self.logit_target(outs, ctx.tau)
            losses["kd"] = self.kd_alpha * ctx.kd_ramp * soft_target_kd_loss(logits, target, ctx.tau)
        return losses
