"""Multi-teacher KD targets and per-sample teacher weights.

All functions take the teachers as a sequence of K ``[B, C]`` logit tensors (or one
``[K, B, C]`` tensor) and return **detached** tensors: they build targets/weights, they are
not trained through.

Target spaces (``space`` argument):

* ``"prob"`` (default): ensemble of the teachers' temperature-scaled distributions,
  ``target_b = sum_i w_bi softmax(t_i,b / T)``.
* ``"logit"``: ensemble in logit space, ``target_b = softmax(sum_i w_bi t_i,b / T)``
  (the form the reference ASIB pipeline uses for ``avg`` / ``weighted_conf``).

Either way the result is a ``[B, C]`` probability matrix at temperature T, to be passed to
:func:`asib_core.losses.soft_target_kd_loss` with the same T.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_temperature, stack_teachers

__all__ = [
    "avg_target",
    "weighted_conf_target",
    "entropy_teacher_weights",
    "camkd_teacher_weights",
]

_SPACES = ("prob", "logit")


def _combine(teachers: Tensor, w: Tensor, T: float, space: str) -> Tensor:
    """teachers [K, B, C], w [B, K] -> target probs [B, C] at temperature T."""
    if space == "prob":
        probs = F.softmax(teachers / T, dim=-1)  # [K, B, C]
        return torch.einsum("bk,kbc->bc", w, probs)
    if space == "logit":
        mixed = torch.einsum("bk,kbc->bc", w, teachers)
        return F.softmax(mixed / T, dim=-1)
    raise ValueError(f"space must be one of {_SPACES}, got {space!r}")


@torch.no_grad()
def avg_target(
    teacher_logits_list,
    temperature: float,
    weights: Optional[Tensor] = None,
    space: str = "prob",
) -> Tensor:
    """Plain (or statically weighted) average of the teachers as a KD target.

    Formula (``space="prob"``)::

        target_b = sum_i w_i softmax(t_i,b / T),   w = weights / sum(weights)  (default 1/K)

    Args:
        teacher_logits_list: K ``[B, C]`` tensors or ``[K, B, C]``.
        temperature: ``T > 0``.
        weights: optional ``[K]`` non-negative static teacher weights (``teacher_weights``);
            normalised to sum to 1. ``None`` -> plain mean.
        space: ``"prob"`` (mean of distributions, default) or ``"logit"`` (softmax of the
            mean logits).

    Returns:
        ``[B, C]`` target probabilities (detached).
    """
    T = check_temperature(temperature)
    teachers = stack_teachers(teacher_logits_list)
    K, B = teachers.shape[0], teachers.shape[1]
    if weights is None:
        w = teachers.new_full((K,), 1.0 / K)
    else:
        w = torch.as_tensor(weights, dtype=teachers.dtype, device=teachers.device).flatten()
        if w.shape[0] != K:
            raise ValueError(f"weights must have K={K} entries, got {w.shape[0]}")
        if (w < 0).any() or not w.sum() > 0:
            raise ValueError("teacher weights must be non-negative with a positive sum")
        w = w / w.sum()
    return _combine(teachers, w.unsqueeze(0).expand(B, K), T, space)


@torch.no_grad()
def weighted_conf_target(
    teacher_logits_list,
    temperature: float,
    confidence_temperature: float = 1.0,
    space: str = "prob",
) -> Tuple[Tensor, Tensor]:
    """Per-sample confidence-weighted teacher ensemble (``kd_target: weighted_conf``).

    Formula::

        a_bi = max_c softmax(t_i,b / T_conf)_c          # teacher i's confidence on sample b
        w_bi = a_bi / sum_j a_bj                          # normalised across teachers
        target_b = sum_i w_bi softmax(t_i,b / T)          # space="prob"

    Args:
        teacher_logits_list: K ``[B, C]`` tensors or ``[K, B, C]``.
        temperature: ``T``, the KD temperature of the returned distribution.
        confidence_temperature: ``T_conf`` used only to measure confidence (the
            reference's ``tau_gate``, default 1.0 = the teacher's own max probability).
        space: ``"prob"`` (default) or ``"logit"`` (softmax(sum_i w_bi t_i,b / T)).

    Returns:
        ``(target_probs [B, C], weights [B, K])``, both detached. With K = 1 the weights are
        all ones and the target is that teacher's distribution.
    """
    T = check_temperature(temperature)
    Tc = check_temperature(confidence_temperature, "confidence_temperature")
    teachers = stack_teachers(teacher_logits_list)
    conf = F.softmax(teachers / Tc, dim=-1).amax(dim=-1).transpose(0, 1)  # [B, K]
    w = conf / conf.sum(dim=1, keepdim=True)
    return _combine(teachers, w, T, space), w


@torch.no_grad()
def entropy_teacher_weights(teacher_logits_list, temperature: float = 1.0) -> Tensor:
    """EBKD per-sample teacher weights (entropy-based multi-teacher KD).

    Formula (per sample b, teacher i)::

        H_bi = -sum_c p_bic log p_bic,   p_bi = softmax(t_i,b / T)
        w_bi = 1 - H_bi / sum_j H_bj

    Exactly as written in kd-reference.md: the weights sum to ``K - 1`` per sample (1 for the
    usual K = 2). With K = 1 the weight is 1. If all teachers have zero entropy the weights
    are ``1 - 1/K``.

    Returns:
        ``[B, K]`` weights (detached).
    """
    T = check_temperature(temperature)
    teachers = stack_teachers(teacher_logits_list)
    K = teachers.shape[0]
    if K == 1:
        return teachers.new_ones(teachers.shape[1], 1)
    log_p = F.log_softmax(teachers / T, dim=-1)
    p = log_p.exp()
    H = -(torch.where(p > 0, p * log_p, torch.zeros_like(p))).sum(dim=-1).transpose(0, 1)  # [B,K]
    total = H.sum(dim=1, keepdim=True)
    ratio = torch.where(total > 0, H / total.clamp_min(1e-30), torch.full_like(H, 1.0 / K))
    return 1.0 - ratio


@torch.no_grad()
def camkd_teacher_weights(teacher_logits_list, target: Tensor) -> Tensor:
    """CA-MKD per-sample teacher weights (confidence-aware multi-teacher KD).

    Formula (per sample b, K >= 2 teachers)::

        ce_bi = CE(t_i,b, y_b)
        w_bi = (1 - softmax_i(ce_b)_i) / (K - 1)      # softmax across teachers

    Teachers with a lower cross-entropy on the true label get a larger weight; the weights
    sum to 1 per sample. With K = 1 the weight is 1.

    Returns:
        ``[B, K]`` weights (detached).
    """
    teachers = stack_teachers(teacher_logits_list)
    K, B = teachers.shape[0], teachers.shape[1]
    if K == 1:
        return teachers.new_ones(B, 1)
    y = target.long().view(-1)
    log_p = F.log_softmax(teachers, dim=-1)  # [K, B, C]
    ce = -log_p.gather(2, y.view(1, B, 1).expand(K, B, 1)).squeeze(2).transpose(0, 1)  # [B, K]
    return (1.0 - F.softmax(ce, dim=1)) / (K - 1)

