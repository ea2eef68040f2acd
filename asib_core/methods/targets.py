"""Which teacher logits a logit-based method distils from (``kd_target``).

With two teachers, logit methods follow ``kd_target``: ``teacher`` uses teacher
``kd_teacher_index``; ``avg`` the (``teacher_weights``-weighted) mean of the teachers'
softened distributions. Feature methods always use teacher ``kd_teacher_index``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from asib_core.config.errors import ConfigError

LOGIT_TARGETS = ("teacher", "avg")


def teacher_weights(cfg: dict, n: int) -> list[float]:
    """``teacher_weights`` normalised to sum 1 (uniform when unset); one non-negative
    weight per teacher or the run is refused."""
    weights = cfg.get("teacher_weights")
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(
            f"teacher_weights={weights} must hold one non-negative weight per teacher ({n}) with a "
            "positive sum; e.g. experiment.teacher_weights=[0.5,0.5] or null for equal weights."
        )
    total = sum(weights)
    return [w / total for w in weights]


def selected_teacher(cfg: dict, n_teachers: int) -> int:
    index = int(cfg.get("kd_teacher_index", 0) or 0)
    if not 0 <= index < n_teachers:
        raise ConfigError(
            f"kd_teacher_index={index} but only {n_teachers} teacher(s) are configured; "
            f"use 0..{n_teachers - 1}."
        )
    return index


def target_probs(cfg: dict, teacher_logits: list[torch.Tensor], tau: float) -> torch.Tensor:
    """Softened target distribution for logit KD at temperature ``tau``."""
    mode = cfg.get("kd_target", "avg")
    if mode not in LOGIT_TARGETS:
        raise ConfigError(
            f"kd_target='{mode}' needs the ASIB method (method=asib); logit baselines accept "
            f"{', '.join(LOGIT_TARGETS)}."
        )
    if len(teacher_logits) == 1 or mode == "teacher":
        index = selected_teacher(cfg, len(teacher_logits)) if mode == "teacher" else 0
        return F.softmax(teacher_logits[index] / tau, dim=1)
    weights = teacher_weights(cfg, len(teacher_logits))
    return sum(w * F.softmax(t / tau, dim=1) for w, t in zip(weights, teacher_logits))
