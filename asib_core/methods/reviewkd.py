"""ReviewKD (Chen, Liu, Zhao, Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021).

Levels: the last ``L = min(#student stages, #teacher stages)`` stages plus the pooled feature
(as a ``[B, C, 1, 1]`` map), shallow to deep. Student inputs are the stage outputs
``feat_4d_layer{i}`` and ``feat_2d``; teacher targets (teacher ``kd_teacher_index``) are the
pre-activation maps ``preact_4d_layer{j}`` and ``feat_2d`` (as in the official code, which
reads the teacher with ``preact=True``).

Review path (attention-based fusion, ABF): starting from the deepest level,
``x_k = BN(conv1x1(f_s^k))`` (``mid = min(512, C_s of the pooled level)`` channels), fused with
the residual of the deeper level ``r`` (nearest-upsampled) as
``x_k = x_k * a_0 + r * a_1`` with ``a = sigmoid(conv1x1([x_k, r]))`` (2 maps), resized
(nearest) to the teacher level's spatial size, then ``out_k = BN(conv3x3(x_k))`` with the
teacher level's channel count; ``x_k`` is the residual passed to the next shallower level.

Loss (every entry already weighted; ``w_e`` the warm-up factor)::

    ce        = ce_alpha * CE(s, y)
    kd        = kd_alpha * kd_ramp * T^2 KL(p_target^T || p_s^T)     (omitted when kd_alpha == 0)
    hcl       = feature_weight * w_e * sum_k HCL(out_k, f_t^k)       (reviewkd_hcl_loss)
    review_at = attention_weight * w_e * sum_{k: h_k > 1} AT(out_k, f_t^k)   (omitted when 0)

``w_e = min(1, (epoch + 1) / W)`` with ``W = max(1, ceil(20 / 240 * total_epochs))``: the
official 20-epoch linear warm-up of a 240-epoch run, expressed as the same fraction of this
run's student epochs (global epoch, does not restart per stage).

``attention_weight`` is **not part of the paper** (the paper's loss is CE + HCL). It weights an
attention-transfer term (Zagoruyko & Komodakis, ``at_loss`` with p = 2: MSE between the
L2-normalised spatial maps ``mean_c f^2``) between each fused review feature and its teacher
map, i.e. it asks the review features to reproduce where the teacher's activation sits, not
only its values. ``attention_weight: 0`` gives the paper's ReviewKD. AT's own reference weight
is 1000, so the seed value 0.5 makes it a weak auxiliary term.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from asib_core.engine.schedules import linear_warmup, scaled_warmup_epochs
from asib_core.losses import at_multi_layer_loss, reviewkd_hcl_loss, soft_target_kd_loss

from ._probe import (
    needed_teachers, probe_shapes, stage_count, teacher_forward, teacher_logits,
)
from asib_core.contract import Batch, Distiller, TrainContext
from .registry import register_method
from .targets import target_probs

#: official schedule: HCL weight ramps linearly over 20 of 240 epochs (scaled to the run)
WARMUP_EPOCHS = 20
MAX_MID_CHANNELS = 512
#: HCL weight when ``feature_weight`` is not configured (kd-reference.md: 5.0 on CIFAR)
DEFAULT_HCL_WEIGHT = 5.0


class ABF(nn.Module):
    """Attention-based fusion of one student level with the residual of the deeper level."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = (nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid())
                         if fuse else None)
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x, residual=None, out_size=None):
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ABF level needs the residual of the deeper level")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if out_size is not None and tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def reviewkd_warmup(epoch: int, total_epochs: int) -> float:
    """``min(1, (epoch + 1) / W)``, ``W = max(1, ceil(total_epochs * 20 / 240))``."""
    return linear_warmup(epoch, scaled_warmup_epochs(WARMUP_EPOCHS, total_epochs))


@register_method("reviewkd")
class ReviewKD(Distiller):
    def __init__(self, student, teachers, cfg):
        super().__init__(student, teachers, cfg)
        self.t_index, self.needed = needed_teachers(cfg, len(self.teachers), self.name, self.kd_alpha != 0)
        fw = cfg.get("feature_weight")
        self.feature_weight = DEFAULT_HCL_WEIGHT if fw is None else float(fw)
        aw = cfg.get("attention_weight")
        self.attention_weight = 0.0 if aw is None else float(aw)
        s_shapes = probe_shapes(self.student)
        t_shapes = probe_shapes(self.teachers[self.t_index])
        n_s, n_t = stage_count(s_shapes), stage_count(t_shapes)
        levels = min(n_s, n_t)
        if levels < 1:
            raise ValueError("ReviewKD needs at least one feature stage in student and teacher")
        self.s_keys = [f"feat_4d_layer{i}" for i in range(n_s - levels + 1, n_s + 1)]
        self.t_keys = [f"preact_4d_layer{j}" for j in range(n_t - levels + 1, n_t + 1)]
        in_ch = [s_shapes[k][1] for k in self.s_keys] + [s_shapes["feat_2d"][1]]
        out_ch = [t_shapes[k][1] for k in self.t_keys] + [t_shapes["feat_2d"][1]]
        mid = min(MAX_MID_CHANNELS, in_ch[-1])
        last = len(in_ch) - 1
        device = next(self.student.parameters()).device
        # abfs[k] serves level k (shallow -> deep); the deepest level has nothing to fuse
        self.abfs = nn.ModuleList(
            [ABF(in_ch[k], mid, out_ch[k], fuse=k < last) for k in range(len(in_ch))]
        ).to(device)

    def auxiliary_modules(self):
        return [self.abfs]

    def review(self, s_out: dict, t_sizes: list) -> list[torch.Tensor]:
        """Fused student features, one per level (shallow -> deep), sized like the teacher's."""
        feats = [s_out[k] for k in self.s_keys] + [s_out["feat_2d"][:, :, None, None]]
        outs: list = [None] * len(feats)
        residual = None
        for k in range(len(feats) - 1, -1, -1):
            outs[k], residual = self.abfs[k](feats[k], residual, t_sizes[k])
        return outs

    def forward_train(self, batch: Batch, ctx: TrainContext):
        s_out = self.student(batch.x)
        logits = s_out["logit"]
        t_outs = teacher_forward(self.teachers, batch.x, self.needed)
        losses = {"ce": self.ce_alpha * batch.ce(logits, self.label_smoothing)}
        if self.kd_alpha != 0:
            target = target_probs(self.cfg, teacher_logits(t_outs), ctx.tau)
            losses["kd"] = self.kd_alpha * ctx.kd_ramp * soft_target_kd_loss(logits, target, ctx.tau)
        t_out = t_outs[self.t_index]
        t_feats = [t_out[k] for k in self.t_keys] + [t_out["feat_2d"][:, :, None, None]]
        fused = self.review(s_out, [tuple(t.shape[-2:]) for t in t_feats])
        warm = reviewkd_warmup(ctx.epoch, ctx.total_epochs)
        losses["hcl"] = self.feature_weight * warm * reviewkd_hcl_loss(fused, t_feats)
        if self.attention_weight > 0:
            pairs = [(s, t) for s, t in zip(fused, t_feats) if t.shape[-2] > 1 or t.shape[-1] > 1]
            if pairs:
                losses["review_at"] = self.attention_weight * warm * at_multi_layer_loss(pairs)
        self.record(reviewkd_warmup=warm)
        return logits, losses
