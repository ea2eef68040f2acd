"""Loss pieces of the ASIB method: IB KL, CCCP term, feature KD, IB certainty weights.

See ``asib-method-spec.md`` sections 2.5, 3.5, 3.6 and ``decisions.md``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import check_reduction, reduce_per_sample, upcast
from .logit import kd_loss

__all__ = ["gaussian_kl", "cccp_loss", "feature_kd_loss", "certainty_weights"]


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    reduction: str = "batchmean",
    logvar_clip: Optional[float] = None,
    element_clip: Optional[float] = None,
) -> Tensor:
    """KL divergence of a diagonal Gaussian from the standard normal (the VIB / IB term).

    Formula (per sample b, over the latent dims j)::

        KL_b = KL( N(mu_b, diag(exp(logvar_b))) || N(0, I) )
             = 0.5 * sum_j ( mu_bj^2 + exp(logvar_bj) - logvar_bj - 1 )

    Args:
        mu, logvar: ``[B, D]`` (any trailing shape is flattened per sample).
        reduction: ``"batchmean"`` (mean over the batch of ``KL_b``, default), ``"sum"``,
            ``"none"`` (``[B]``).
        logvar_clip: if set, ``logvar`` is clamped to ``[-logvar_clip, logvar_clip]`` first
            (the reference clamps to +-10 here; the A-step first clamps to
            ``ib_mbm_logvar_clip``). Note the clamp has zero gradient outside the range.
        element_clip: if set, each per-dimension term is clamped to
            ``[-element_clip, element_clip]`` before the sum (reference: 100).

    Computed in float32 at least. The caller multiplies by ``beta(G)``.
    Reference: Alemi et al., "Deep Variational Information Bottleneck", ICLR 2017.
    """
    m = upcast(mu)
    lv = upcast(logvar)
    if m.shape != lv.shape:
        raise ValueError(f"mu {tuple(m.shape)} and logvar {tuple(lv.shape)} differ")
    if m.dim() == 1:
        m, lv = m.unsqueeze(0), lv.unsqueeze(0)
    if logvar_clip is not None:
        lv = lv.clamp(-float(logvar_clip), float(logvar_clip))
    elem = 0.5 * (m.pow(2) + lv.exp() - lv - 1.0)
    if element_clip is not None:
        elem = elem.clamp(-float(element_clip), float(element_clip))
    return reduce_per_sample(elem.flatten(1).sum(dim=1), reduction)


def cccp_loss(
    synergy_logits: Tensor,
    student_logits: Tensor,
    tau: float,
    reduction: str = "batchmean",
) -> Tensor:
    """CCCP term of the ASIB A-step: pull the synergy distribution toward the frozen student.

    Formula (per sample b)::

        cccp_b = tau^2 * KL( softmax(s_b / tau) || softmax(z_b / tau) )

    with ``s`` the student logits used as a **detached target** and ``z`` the synergy logits,
    which receive the gradient. (Same math as ``kd_loss(z, s, tau)``: here the "student" of
    the KD is the synergy head.) The caller multiplies by ``cccp_alpha`` and the ramp
    (decisions.md: ``cccp_alpha * tau^2 * KL(student || synergy)``).

    Args:
        synergy_logits: ``z``, ``[B, C]`` (grad).
        student_logits: ``s``, ``[B, C]`` (detached inside).
        tau: temperature > 0.
        reduction: ``"batchmean"`` | ``"sum"`` | ``"none"``.
    """
    return kd_loss(synergy_logits, student_logits, tau, reduction=reduction, detach_target=True)


_FEAT_REDUCTIONS = ("batchmean", "sum", "none", "mean")


def feature_kd_loss(
    student_feat: Tensor,
    target_feat: Tensor,
    clip: Optional[float] = None,
    huber_beta: Optional[float] = None,
    reduction: str = "batchmean",
    feature_reduction: str = "sum",
    clip_mode: str = "element",
    detach_target: bool = False,
) -> Tensor:
    """Feature-level KD distance between a student feature and a target feature (e.g. IB mu).

    Per element ``d = s - t`` (any shape ``[B, ...]``)::

        if clip is set and clip_mode == "element":  d <- clamp(d, -clip, clip)
        e = d^2                                      if huber_beta is None   (squared error)
        e = 0.5 d^2 / beta   if |d| < beta else |d| - 0.5 beta   (smooth-L1 with beta;
            beta = 0 gives |d|; same convention as torch's smooth_l1_loss)
        per_sample_b = sum_j e_bj   (feature_reduction="sum")   or mean_j e_bj ("mean")
        if clip is set and clip_mode == "sample":   per_sample_b <- min(per_sample_b, clip)

    Clipping: ``"element"`` (default) bounds each difference to ``[-clip, clip]`` before the
    distance, so elements with ``|d| > clip`` contribute a constant and no gradient;
    ``"sample"`` caps the per-sample value (the reading of ``feat_kd_clip`` in spec 3.6.9);
    a capped sample then has no gradient.

    Args:
        student_feat: ``[B, ...]``.
        target_feat: same shape. Not detached by default, because the ASIB A-step trains the
            IB encoder through ``mu`` with this term; pass ``detach_target=True`` (or a
            detached tensor) in the B-step.
        clip: ``> 0`` or None.
        huber_beta: ``>= 0`` or None (squared error).
        reduction: ``"batchmean"`` (mean of per-sample values), ``"sum"``, ``"none"`` (``[B]``)
            or ``"mean"`` (mean over all elements = batchmean of per-sample means; for
            ``"mean"`` ``feature_reduction`` is ignored, and with sample clipping the cap
            applies to the per-sample mean).
        feature_reduction: ``"sum"`` (spec 3.6.6, B-step) or ``"mean"`` (spec 3.4, A-step).
    """
    s = upcast(student_feat)
    t = upcast(target_feat)
    if detach_target:
        t = t.detach()
    if s.shape != t.shape:
        raise ValueError(f"feature_kd_loss: shapes differ, {tuple(s.shape)} vs {tuple(t.shape)}")
    check_reduction(reduction, _FEAT_REDUCTIONS)
    if feature_reduction not in ("sum", "mean"):
        raise ValueError(f"feature_reduction must be 'sum' or 'mean', got {feature_reduction!r}")
    if clip_mode not in ("element", "sample"):
        raise ValueError(f"clip_mode must be 'element' or 'sample', got {clip_mode!r}")
    if clip is not None and not float(clip) > 0:
        raise ValueError(f"clip must be > 0 or None, got {clip!r}")
    if huber_beta is not None and float(huber_beta) < 0:
        raise ValueError(f"huber_beta must be >= 0 or None, got {huber_beta!r}")

    d = s - t
    if s.dim() == 1:
        d = d.unsqueeze(1)
    if clip is not None and clip_mode == "element":
        d = d.clamp(-float(clip), float(clip))
    if huber_beta is None:
        e = d.pow(2)
    elif float(huber_beta) == 0.0:
        e = d.abs()
    else:
        beta = float(huber_beta)
        ad = d.abs()
        e = torch.where(ad < beta, 0.5 * d.pow(2) / beta, ad - 0.5 * beta)
    e = e.flatten(1)
    if reduction == "mean":
        per_sample = e.mean(dim=1)
        red = "batchmean"
    else:
        per_sample = e.sum(dim=1) if feature_reduction == "sum" else e.mean(dim=1)
        red = reduction
    if clip is not None and clip_mode == "sample":
        per_sample = per_sample.clamp(max=float(clip))
    return reduce_per_sample(per_sample, red)


@torch.no_grad()
def certainty_weights(
    logvar: Tensor,
    min_cw: float,
    max_cw: float,
    normalize: bool = True,
    mode: str = "mean_precision",
    eps: float = 1e-8,
) -> Tensor:
    """Per-sample IB certainty weights from the IB log-variance (detached).

    Formula (``mode="mean_precision"``, default; spec 3.6.5)::

        m_b  = mean_j exp(-logvar_bj)          # mean precision of sample b's latent
        r_b  = m_b / mean_b' m_b'   if normalize else m_b
        cw_b = clamp(r_b, min_cw, max_cw)

    ``mode="exp_neg_mean_logvar"`` uses ``m_b = exp(-mean_j logvar_bj)`` (the geometric mean
    of the precisions) instead. Low variance (a confident IB encoding) -> larger weight.

    ``normalize=True`` (B-step, spec 3.6.5: weights relative to the batch, so they average to
    about 1 before clamping and do not change the overall KD scale);
    ``normalize=False`` with ``max_cw=1`` is the A-step form of spec 3.4 (absolute
    precision, no up-weighting).

    Args:
        logvar: ``[B, D]`` (the caller applies any logvar clip first).
        min_cw, max_cw: clamp bounds (spec defaults 0.1 / 1.5; IB rungs 0.5 / 1.5).
        eps: floor of the batch mean in the normalisation.

    Returns:
        ``[B]`` float32 (or float64) weights, no gradient.
    """
    if not min_cw <= max_cw:
        raise ValueError(f"min_cw ({min_cw}) must be <= max_cw ({max_cw})")
    lv = upcast(logvar).detach()
    if lv.dim() == 1:
        lv = lv.unsqueeze(1)
    lv = lv.flatten(1)
    if mode == "mean_precision":
        m = torch.exp(-lv).mean(dim=1)
    elif mode == "exp_neg_mean_logvar":
        m = torch.exp(-lv.mean(dim=1))
    else:
        raise ValueError(f"mode must be 'mean_precision' or 'exp_neg_mean_logvar', got {mode!r}")
    if normalize:
        m = m / m.mean().clamp_min(eps)
    return m.clamp(float(min_cw), float(max_cw))

