"""Logit-based distillation losses: Hinton KD, soft-target KD, DKD, multi-teacher KD.

Notation: ``p^T = softmax(z / T)`` over classes; ``KL(a || b) = sum_c a_c (log a_c - log b_c)``.
Shapes: logits ``[B, C]``, class targets ``[B]`` (int64). See ``_common`` for ``reduction``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import (
    check_temperature,
    kl_rows,
    reduce_per_sample,
    stack_teachers,
    upcast,
)

__all__ = ["kd_loss", "soft_target_kd_loss", "dkd_loss", "multi_teacher_kd_loss"]


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float,
    reduction: str = "batchmean",
    detach_target: bool = True,
) -> Tensor:
    """Hinton knowledge distillation loss.

    Formula (per sample b)::

        kd_b = T^2 * KL(softmax(t_b / T) || softmax(s_b / T))
             = T^2 * sum_c q_bc (log q_bc - log p_bc)

    Args:
        student_logits: ``s``, ``[B, C]``; receives the gradient.
        teacher_logits: ``t``, ``[B, C]``; the target (any logits: a teacher, an ensemble
            in logit space, the synergy head, or the frozen student in the ASIB A-step).
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` (default, mean over the batch), ``"sum"`` or ``"none"``
            (per-sample ``[B]`` vector, e.g. for per-sample weights).
        detach_target: if True (default) the target logits are detached so the gradient
            flows into ``student_logits`` only.

    Gradient (closed form, batchmean): ``d loss / d s_bc = T * (p_bc - q_bc) / B``.

    The ``T^2`` factor keeps the gradient magnitude independent of ``T``.
    Reference: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """
    T = check_temperature(temperature)
    s = upcast(student_logits)
    t = upcast(teacher_logits)
    if detach_target:
        t = t.detach()
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and target {tuple(t.shape)} logits differ")
    log_p = F.log_softmax(s / T, dim=-1)
    log_q = F.log_softmax(t / T, dim=-1)
    per_sample = (T * T) * kl_rows(log_q.exp(), log_q, log_p)
    return reduce_per_sample(per_sample, reduction)


def soft_target_kd_loss(
    student_logits: Tensor,
    target_probs: Tensor,
    temperature: float,
    reduction: str = "batchmean",
    detach_target: bool = True,
) -> Tensor:
    """KD toward a given target distribution (ensembles, mixed targets, synergy targets).

    Formula (per sample b)::

        kd_b = T^2 * sum_c q_bc (log q_bc - log softmax(s_b / T)_c)

    with ``0 * log 0 = 0`` for zero-probability classes.

    Args:
        student_logits: ``[B, C]``.
        target_probs: ``q``, ``[B, C]``, rows summing to 1, **already at temperature T**
            (e.g. ``avg_target(..., T)`` or ``weighted_conf_target(..., T)``).
        temperature: ``T > 0`` applied to the student logits and in the ``T^2`` factor.
        reduction: ``"batchmean"`` | ``"sum"`` | ``"none"``.
        detach_target: detach ``target_probs`` (default True).

    Equals :func:`kd_loss` when ``q = softmax(t / T)``.
    """
    T = check_temperature(temperature)
    s = upcast(student_logits)
    q = upcast(target_probs)
    if detach_target:
        q = q.detach()
    if s.shape != q.shape:
        raise ValueError(f"student {tuple(s.shape)} and target {tuple(q.shape)} differ")
    log_p = F.log_softmax(s / T, dim=-1)
    log_q = torch.log(q.clamp_min(torch.finfo(q.dtype).tiny))
    per_sample = (T * T) * kl_rows(q, log_q, log_p)
    return reduce_per_sample(per_sample, reduction)


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    reduction: str = "batchmean",
    return_parts: bool = False,
    detach_target: bool = True,
    mask_value: float = 1000.0,
):
    """Decoupled knowledge distillation (DKD), without CE and without the warm-up factor.

    Formula (per sample, ``y`` the target class, ``p = softmax(s/T)``, ``q = softmax(t/T)``)::

        b_s = (p_y, 1 - p_y),   b_t = (q_y, 1 - q_y)           # binary masses
        TCKD = T^2 * KL(b_t || b_s)
        p~ = softmax(s/T - mask_value * onehot(y)),  q~ = same for t   # non-target classes
        NCKD = T^2 * KL(q~ || p~)
        DKD  = alpha * TCKD + beta * NCKD

    The target logit is masked by subtracting ``mask_value`` (1000) from the *temperature
    scaled* logit before the softmax, so ``p~``/``q~`` are the softmaxes over the non-target
    classes up to a relative error ~exp(-1000) (i.e. exact in float32/float64).
    The binary masses are computed in log space (``log p_y`` and ``logsumexp`` of the
    other log-probabilities), which stays finite when ``p_y`` saturates at 1.

    The caller adds ``CE`` and the warm-up ``min(epoch / warmup, 1)``; the reference defaults
    are T = 4, alpha = 1, beta = 8 on CIFAR-100 (kd-reference.md).

    Args:
        student_logits, teacher_logits: ``[B, C]`` (C >= 2).
        target: ``[B]`` int64 ground-truth classes.
        alpha, beta: weights of TCKD and NCKD.
        temperature: ``T > 0``.
        reduction: ``"batchmean"`` | ``"sum"`` | ``"none"`` (applied to every returned value).
        return_parts: if True return ``(total, tckd, nckd)`` with *unweighted* TCKD/NCKD
            (``total = alpha * tckd + beta * nckd``); else ``total``.
        detach_target: detach the teacher logits (default True).
        mask_value: amount subtracted from the scaled target logit for NCKD.

    Reference: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.
    """
    T = check_temperature(temperature)
    s = upcast(student_logits)
    t = upcast(teacher_logits)
    if detach_target:
        t = t.detach()
    if s.shape != t.shape or s.dim() != 2:
        raise ValueError(f"logits must both be [B, C], got {tuple(s.shape)} and {tuple(t.shape)}")
    if s.shape[1] < 2:
        raise ValueError("DKD needs at least 2 classes")
    target = target.long().view(-1)
    if target.shape[0] != s.shape[0]:
        raise ValueError("target must have one class index per sample")

    s = s / T
    t = t / T
    gt = F.one_hot(target, num_classes=s.shape[1]).to(torch.bool)

    # --- TCKD: binary (target, rest) distributions, in log space ---
    def _binary_log_masses(z: Tensor) -> Tensor:
        log_prob = F.log_softmax(z, dim=-1)
        log_tgt = log_prob.gather(1, target.unsqueeze(1)).squeeze(1)
        log_rest = torch.logsumexp(log_prob.masked_fill(gt, float("-inf")), dim=-1)
        return torch.stack([log_tgt, log_rest], dim=-1)  # [B, 2]

    log_bs = _binary_log_masses(s)
    log_bt = _binary_log_masses(t)
    tckd = (T * T) * kl_rows(log_bt.exp(), log_bt, log_bs)

    # --- NCKD: distributions over the non-target classes ---
    log_ps_nt = F.log_softmax(s - mask_value * gt.to(s.dtype), dim=-1)
    log_pt_nt = F.log_softmax(t - mask_value * gt.to(t.dtype), dim=-1)
    nckd = (T * T) * kl_rows(log_pt_nt.exp(), log_pt_nt, log_ps_nt)

    total = alpha * tckd + beta * nckd
    if return_parts:
        return (
            reduce_per_sample(total, reduction),
            reduce_per_sample(tckd, reduction),
            reduce_per_sample(nckd, reduction),
        )
    return reduce_per_sample(total, reduction)


def multi_teacher_kd_loss(
    student_logits: Tensor,
    teacher_logits_list,
    temperature: float,
    weights: Optional[Tensor] = None,
    reduction: str = "batchmean",
) -> Tensor:
    """Weighted sum of per-teacher KD terms (AVER / EBKD / CA-MKD style multi-teacher KD).

    Formula (per sample b, K teachers)::

        loss_b = sum_i w_bi * T^2 * KL(softmax(t_i,b / T) || softmax(s_b / T))

    Args:
        student_logits: ``[B, C]``.
        teacher_logits_list: sequence of K ``[B, C]`` tensors or a ``[K, B, C]`` tensor.
        temperature: ``T > 0``.
        weights: ``None`` -> ``1/K`` for every teacher (AVER: mean of the per-teacher KL);
            ``[K]`` -> static per-teacher weights (used as given, not renormalised);
            ``[B, K]`` -> per-sample weights (e.g. :func:`entropy_teacher_weights`,
            :func:`camkd_teacher_weights`). Weights are detached.
        reduction: ``"batchmean"`` | ``"sum"`` | ``"none"``.

    This differs from KD toward an *ensemble target* (:func:`avg_target` +
    :func:`soft_target_kd_loss`): here the KL terms are averaged, not the distributions.
    """
    teachers = stack_teachers(teacher_logits_list)  # [K, B, C]
    K, B = teachers.shape[0], teachers.shape[1]
    per_teacher = torch.stack(
        [kd_loss(student_logits, teachers[i], temperature, reduction="none") for i in range(K)],
        dim=1,
    )  # [B, K]
    if weights is None:
        w = per_teacher.new_full((B, K), 1.0 / K)
    else:
        w = upcast(weights).detach().to(per_teacher.dtype)
        if w.dim() == 1:
            if w.shape[0] != K:
                raise ValueError(f"weights [K] must have K={K} entries, got {w.shape[0]}")
            w = w.unsqueeze(0).expand(B, K)
        elif tuple(w.shape) != (B, K):
            raise ValueError(f"weights must be [K] or [B, K]=({B}, {K}), got {tuple(w.shape)}")
    return reduce_per_sample((w * per_teacher).sum(dim=1), reduction)
