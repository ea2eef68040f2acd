"""SimKD (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022).

The student's last feature map ``f_s = feat_4d`` goes through a projector
``P = [1x1 conv -> C_t/2, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv -> C_t, BN, ReLU]`` and is
classified by a frozen copy of the classifier of teacher ``kd_teacher_index``::

    spatial alignment (official rule): if H_s > H_t, f_s is average-pooled to the teacher size,
                                       else the teacher map is pooled to the student size
    logits = W_t · mean_hw P(f_s) + b_t           (training AND forward_test)

Loss (every entry already weighted)::

    ce    = ce_alpha * CE(logits, y)
    kd    = kd_alpha * kd_ramp * T^2 KL(p_target^T || softmax(logits / T))   (omitted when 0)
    simkd = feature_weight * MSE(P(f_s), f_t)                               (simkd_loss)

The paper trains with the MSE alone: ``ce_alpha: 0, kd_alpha: 0`` reproduces it (CE and KD,
kept by the project convention, then contribute nothing). The student's own classifier is not
used and not optimised. The deployed model is student + projector + teacher head:
``deploy_state()`` holds all three (plus the shapes needed to rebuild them), and
:class:`SimKDDeployed` evaluates it without any teacher.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.losses import simkd_loss, soft_target_kd_loss

from ._probe import (
    needed_teachers, probe_shapes, teacher_forward, teacher_logits,
)
from asib_core.contract import Batch, Distiller, TrainContext
from .registry import register_method
from .targets import target_probs

#: bottleneck factor of the projector (hidden width C_t / 2, as in the paper)
PROJECTOR_FACTOR = 2


class SimKDProjector(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, hidden: int | None = None):
        hidden = hidden if hidden is not None else max(1, out_channels // PROJECTOR_FACTOR)
        super().__init__(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.in_channels, self.hidden, self.out_channels = in_channels, hidden, out_channels


def _pooled_size(size: tuple[int, int], s_ref: tuple[int, int],
                 t_ref: tuple[int, int]) -> tuple[int, int] | None:
    """Size the student map is pooled to without a teacher map (None: keep it).

    ``s_ref``/``t_ref`` are the student/teacher map sizes of a 32x32 probe; the ratio is applied
    to the actual map size (identical to the training-time rule at the probe resolution).
    """
    if s_ref[0] <= t_ref[0]:
        return None
    return (max(1, size[0] * t_ref[0] // s_ref[0]), max(1, size[1] * t_ref[1] // s_ref[1]))


def simkd_predict(student: nn.Module, projector: nn.Module, head: nn.Module, x: torch.Tensor,
                  s_ref: tuple[int, int], t_ref: tuple[int, int]) -> torch.Tensor:
    """Deployed SimKD logits: teacher head on the pooled projected student feature."""
    f_s = student(x)["feat_4d"]
    size = _pooled_size(tuple(f_s.shape[-2:]), s_ref, t_ref)
    if size is not None:
        f_s = F.adaptive_avg_pool2d(f_s, size)
    return head(projector(f_s).mean(dim=(2, 3)))


class SimKDDeployed(nn.Module):
    """Student + projector + copied teacher classifier, evaluable without the teacher."""

    def __init__(self, student: nn.Module, projector: SimKDProjector, head: nn.Linear,
                 s_ref: tuple[int, int], t_ref: tuple[int, int]):
        super().__init__()
        self.student, self.projector, self.head = student, projector, head
        self.s_ref, self.t_ref = tuple(s_ref), tuple(t_ref)

    @classmethod
    def from_deploy_state(cls, student: nn.Module, state: dict) -> "SimKDDeployed":
        """Rebuild from ``SimKD.deploy_state()``; ``student`` is a fresh model of the right arch."""
        meta = state["simkd"]["shapes"]
        projector = SimKDProjector(meta["s_channels"], meta["t_channels"], meta["hidden"])
        head = nn.Linear(meta["t_channels"], meta["num_classes"])
        student.load_state_dict(state["student"])
        projector.load_state_dict(state["simkd"]["projector"])
        head.load_state_dict(state["simkd"]["teacher_head"])
        device = next(student.parameters()).device
        return cls(student, projector.to(device), head.to(device), meta["s_hw"], meta["t_hw"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simkd_predict(self.student, self.projector, self.head, x, self.s_ref, self.t_ref)


@register_method("simkd")
class SimKD(Distiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.t_index, self.needed = needed_teachers(cfg, len(self.teachers), self.name, self.kd_alpha != 0)
        fw = cfg.get("feature_weight")
        self.feature_weight = 1.0 if fw is None else float(fw)
        teacher = self.teachers[self.t_index]
        s_shapes, t_shapes = probe_shapes(self.student), probe_shapes(teacher)
        s_ch, t_ch = s_shapes["feat_4d"][1], t_shapes["feat_4d"][1]
        self.s_ref = tuple(s_shapes["feat_4d"][-2:])
        self.t_ref = tuple(t_shapes["feat_4d"][-2:])
        device = next(self.student.parameters()).device
        self.projector = SimKDProjector(s_ch, t_ch).to(device)
        if not isinstance(teacher.classifier, nn.Linear) or teacher.classifier.in_features != t_ch:
            raise ValueError("SimKD needs a teacher whose classifier is a Linear on its pooled feat_4d")
        self.teacher_head = copy.deepcopy(teacher.classifier).requires_grad_(False)

    def auxiliary_modules(self):
        return [self.projector]

    def student_parameters(self):
        unused = {id(p) for p in self.student.classifier.parameters()}
        return [p for p in self.student.parameters() if p.requires_grad and id(p) not in unused]

    def forward_train(self, batch: Batch, ctx: TrainContext):
        f_s = self.student(batch.x)["feat_4d"]
        t_outs = teacher_forward(self.teachers, batch.x, self.needed)
        f_t = t_outs[self.t_index]["feat_4d"]
        s_hw, t_hw = tuple(f_s.shape[-2:]), tuple(f_t.shape[-2:])
        if s_hw[0] > t_hw[0]:
            f_s = F.adaptive_avg_pool2d(f_s, t_hw)
        elif s_hw != t_hw:
            f_t = F.adaptive_avg_pool2d(f_t, s_hw)
        projected = self.projector(f_s)
        logits = self.teacher_head(projected.mean(dim=(2, 3)))
        losses = {"ce": self.ce_alpha * batch.ce(logits, self.label_smoothing)}
        if self.kd_alpha != 0:
            target = target_probs(self.cfg, teacher_logits(t_outs), ctx.tau)
            losses["kd"] = self.kd_alpha * ctx.kd_ramp * soft_target_kd_loss(logits, target, ctx.tau)
        losses["simkd"] = self.feature_weight * simkd_loss(projected, f_t)
        return logits, losses

    def forward_test(self, x: torch.Tensor) -> torch.Tensor:
        return simkd_predict(self.student, self.projector, self.teacher_head, x, self.s_ref, self.t_ref)

    # -- deployment -----------------------------------------------------------
    def deploy_state(self) -> dict:
        return {
            "student": self.student.state_dict(),
            "simkd": {
                "projector": self.projector.state_dict(),
                "teacher_head": self.teacher_head.state_dict(),
                "shapes": {
                    "s_channels": self.projector.in_channels, "t_channels": self.projector.out_channels,
                    "hidden": self.projector.hidden, "num_classes": self.teacher_head.out_features,
                    "s_hw": list(self.s_ref), "t_hw": list(self.t_ref),
                },
            },
        }

    def load_deploy_state(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.projector.load_state_dict(state["simkd"]["projector"])
        self.teacher_head.load_state_dict(state["simkd"]["teacher_head"])

    def deployed_model(self) -> SimKDDeployed:
        """The deployable network (shares modules with this distiller)."""
        return SimKDDeployed(self.student, self.projector, self.teacher_head, self.s_ref, self.t_ref)
