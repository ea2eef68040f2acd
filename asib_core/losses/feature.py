"""Feature-map distillation losses: FitNet, AT, AB, FT, SimKD, ReviewKD (HCL).

Feature maps are ``[B, C, H, W]``. The modules that produce the inputs (FitNet regressor,
AB connector, FT paraphraser/translator, SimKD projector, ReviewKD ABF fusion) belong to the
methods; these functions only hold the loss math. Teacher-side inputs are detached.
"""

from __future__ import annotations

from typing import Iterable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import l2_normalize, upcast

__all__ = [
    "fitnet_loss",
    "nonnegative_fit_floor",
    "at_map",
    "at_loss",
    "at_multi_layer_loss",
    "ab_loss",
    "ab_multi_layer_loss",
    "ft_factor",
    "ft_loss",
    "simkd_loss",
    "reviewkd_hcl_loss",
]


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).mean()


def fitnet_loss(regressed_student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """FitNet hint loss: ``mean((r(f_s) - f_t)^2)`` over all elements (MSE, reduction mean).

    Args:
        regressed_student_feat: the student hint-layer map after the regressor, ``[B, C, H, W]``.
        teacher_feat: the teacher hint map, same shape (detached).

    Reference weight 100 with CE 1 (kd-reference.md).
    Reference: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.
    """
    s = upcast(regressed_student_feat)
    t = upcast(teacher_feat).detach()
    _same_shape(s, t, "fitnet_loss")
    return _mse(s, t)


def nonnegative_fit_floor(teacher_feat: Tensor) -> Tensor:
    """``mean(min(f_t, 0)^2)``: the part of ``mean((r - f_t)^2)`` that no non-negative ``r``
    (a regressor ending in ReLU, RepDistiller's ConvReg) can remove, since its best output on a
    negative entry is 0. Zero for a post-ReLU map; large for a pre-activation stage output."""
    t = upcast(teacher_feat).detach()
    return t.clamp(max=0).pow(2).mean()


def simkd_loss(projected_student_feat: Tensor, teacher_feat: Tensor) -> Tensor:
    """SimKD loss: ``mean((proj(f_s) - f_t)^2)`` over all elements (MSE, reduction mean).

    Args:
        projected_student_feat: the student's last map through the SimKD projector.
        teacher_feat: the teacher's last map, same shape (detached).

    SimKD trains with this loss only (no CE, no KD); the student classifies with the frozen
    teacher head on the pooled projected feature.
    Reference: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022.
    """
    s = upcast(projected_student_feat)
    t = upcast(teacher_feat).detach()
    _same_shape(s, t, "simkd_loss")
    return _mse(s, t)


def _match_spatial(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two 4-D maps to the smaller spatial size."""
    ha, wa = a.shape[-2:]
    hb, wb = b.shape[-2:]
    if (ha, wa) == (hb, wb):
        return a, b
    size = (min(ha, hb), min(wa, wb))
    if (ha, wa) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if (hb, wb) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def at_map(feat: Tensor, p: float = 2, eps: float = 1e-12) -> Tensor:
    """Attention map of Attention Transfer.

    Formula::

        at(f)_b = v_b / ||v_b||_2,   v_b = flatten_{h,w}( mean_c |f_bchw|^p )

    Args:
        feat: ``[B, C, H, W]``.
        p: exponent (2 in the paper and the reference). ``|f|^p`` equals ``f^p`` for even p.
        eps: lower bound of the norm (all-zero maps give a zero map).

    Returns:
        ``[B, H * W]``.
    """
    f = upcast(feat)
    if f.dim() != 4:
        raise ValueError(f"at_map expects [B, C, H, W], got {tuple(f.shape)}")
    v = f.abs().pow(p).mean(dim=1).flatten(1)
    return l2_normalize(v, dim=1, eps=eps)


def at_loss(student_feat: Tensor, teacher_feat: Tensor, p: float = 2) -> Tensor:
    """Attention-transfer loss for ONE pair of maps.

    Formula::

        loss = mean_{b, j} (at(f_s)_bj - at(f_t)_bj)^2

    (mean over batch and the H*W positions). If the spatial sizes differ, the larger
    *feature map* is adaptive-average-pooled to the smaller size before the attention maps
    are computed. Channel counts may differ. The teacher map is detached.

    The caller sums over the middle stages (:func:`at_multi_layer_loss`) and applies the
    weight (1000 in kd-reference.md).
    Reference: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.
    """
    s = upcast(student_feat)
    t = upcast(teacher_feat).detach()
    if s.shape[0] != t.shape[0]:
        raise ValueError("at_loss: batch sizes differ")
    s, t = _match_spatial(s, t)
    return (at_map(s, p) - at_map(t, p)).pow(2).mean()


def at_multi_layer_loss(pairs: Iterable[Tuple[Tensor, Tensor]], p: float = 2) -> Tensor:
    """Sum of :func:`at_loss` over ``(student_feat, teacher_feat)`` pairs (unweighted)."""
    losses = [at_loss(s, t, p) for s, t in pairs]
    if not losses:
        raise ValueError("at_multi_layer_loss needs at least one pair")
    return torch.stack(losses).sum()


def ab_loss(student_preact: Tensor, teacher_preact: Tensor, margin: float = 1.0) -> Tensor:
    """Activation-boundary loss for ONE pair of pre-activation maps.

    Formula (elementwise, s = student pre-activation after the connector, t = teacher
    pre-activation, m = margin)::

        l = (s + m)^2 * 1[s > -m and t <= 0]     # teacher neuron off: push s below -m
          + (s - m)^2 * 1[s <= m and t > 0]      # teacher neuron on:  push s above +m
        loss = sum over all elements (B, C, H, W) of l, divided by B

    Normalisation: the sum over channels and positions is divided by the batch size only
    (per-sample sum, batch mean). The layer weights ``2^(i - n + 1)`` and the ``/ 1000 * 3``
    scaling are applied by :func:`ab_multi_layer_loss`. The teacher map is detached.

    Reference: Heo et al., "Knowledge Transfer via Distillation of Activation Boundaries
    Formed by Hidden Neurons", AAAI 2019.
    """
    s = upcast(student_preact)
    t = upcast(teacher_preact).detach()
    _same_shape(s, t, "ab_loss")
    m = float(margin)
    off = (s > -m) & (t <= 0)
    on = (s <= m) & (t > 0)
    zero = torch.zeros_like(s)
    elem = torch.where(off, (s + m).pow(2), zero) + torch.where(on, (s - m).pow(2), zero)
    return elem.sum() / max(s.shape[0], 1)


def ab_multi_layer_loss(
    pairs: Sequence[Tuple[Tensor, Tensor]],
    margin: float = 1.0,
    scale: float = 3.0 / 1000.0,
) -> Tensor:
    """AB loss over n layer pairs with the reference layer weights and scaling.

    Formula (pairs ordered shallow -> deep, i = 0 .. n-1)::

        loss = scale * sum_i 2^(i - n + 1) * ab_loss(s_i, t_i, margin)

    so the deepest layer has weight 1, the one before 1/2, ...; ``scale = 3 / 1000`` and
    ``ab_loss`` already divides by the batch size (together: ``/ B / 1000 * 3``).
    """
    pairs = list(pairs)
    n = len(pairs)
    if n == 0:
        raise ValueError("ab_multi_layer_loss needs at least one pair")
    terms = [(2.0 ** (i - n + 1)) * ab_loss(s, t, margin) for i, (s, t) in enumerate(pairs)]
    return scale * torch.stack(terms).sum()


_FT_MODES = ("flatten", "channel_mean_square")


def ft_factor(factor: Tensor, mode: str = "flatten", eps: float = 1e-12) -> Tensor:
    """Normalised factor of Factor Transfer.

    * ``mode="flatten"`` (FT paper): ``F(x)_b = flatten(x_b) / ||flatten(x_b)||_2``, the whole
      factor map (all channels and positions) normalised per sample.
    * ``mode="channel_mean_square"`` (RepDistiller's ``FactorTransfer.factor`` with p1 = 2, the
      ``F(f) = l2_normalize(mean_c f^2)`` form quoted in kd-reference.md; the ``ft`` method's):
      the attention-like map ``mean_c x^2`` flattened and normalised.

    Returns ``[B, D]``.
    """
    x = upcast(factor)
    if mode == "flatten":
        v = x.flatten(1)
    elif mode == "channel_mean_square":
        if x.dim() != 4:
            raise ValueError("channel_mean_square mode expects [B, C, H, W]")
        v = x.pow(2).mean(dim=1).flatten(1)
    else:
        raise ValueError(f"mode must be one of {_FT_MODES}, got {mode!r}")
    return l2_normalize(v, dim=1, eps=eps)


def ft_loss(
    student_factor: Tensor,
    teacher_factor: Tensor,
    p: int = 1,
    mode: str = "flatten",
) -> Tensor:
    """Factor-transfer loss between the translator (student) and paraphraser (teacher) factors.

    Formula (default, the FT paper)::

        loss = mean_{b, j} | F(x_s)_bj - F(x_t)_bj |^p,   F = ft_factor(., mode)

    with p = 1 (L1) as in the paper; the mean runs over batch and factor elements.
    The paper states the distance as ``|| F_T/||F_T|| - F_S/||F_S|| ||_p``; the per-element mean
    only rescales it by a constant (absorbed by the FT weight, 200 in kd-reference.md).
    The factors have the same shape (the translator outputs the paraphraser's factor size).
    The teacher factor is detached.

    ``mode="channel_mean_square"`` gives RepDistiller's variant (the one the ``ft`` method uses)
    ``mean |l2n(mean_c x_s^2) - l2n(mean_c x_t^2)|``.

    Reference: Kim, Park, Kwak, "Paraphrasing Complex Network: Network Compression via Factor
    Transfer", NeurIPS 2018.
    """
    s = ft_factor(student_factor, mode)
    t = ft_factor(upcast(teacher_factor).detach(), mode)
    _same_shape(s, t, "ft_loss")
    d = (s - t).abs()
    if p == 1:
        return d.mean()
    return d.pow(p).mean()


def reviewkd_hcl_loss(
    student_feats: Sequence[Tensor],
    teacher_feats: Sequence[Tensor],
    pool_sizes: Sequence[int] = (4, 2, 1),
) -> Tensor:
    """ReviewKD hierarchical context loss (HCL), summed over levels.

    Formula for one level with maps ``f_s, f_t`` of shape ``[B, C, h, w]``::

        pools   = [l for l in pool_sizes (in the given order 4, 2, 1) if l < h]
        weight_j = 2^-j for the j-th *used* pool size, j = 1, 2, ... (so the first used
                   size gets 1/2, the next 1/4, ...; skipped sizes do not consume a j)
        HCL = ( MSE(f_s, f_t) + sum_j 2^-j MSE(P_l_j(f_s), P_l_j(f_t)) ) / (1 + sum_j 2^-j)

    where ``P_l`` is adaptive average pooling to ``l x l`` and MSE is the element mean.
    Example: h = 8 uses l = 4, 2, 1 with weights 1/2, 1/4, 1/8; h = 4 uses l = 2, 1 with
    weights 1/2, 1/4; h = 1 uses none. The condition uses the height ``h`` (square maps).

    Args:
        student_feats: per-level student maps after the ABF fusion.
        teacher_feats: per-level teacher maps, same shapes (detached).

    Reference: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021.
    """
    if len(student_feats) != len(teacher_feats):
        raise ValueError("reviewkd_hcl_loss: different numbers of student and teacher levels")
    if len(student_feats) == 0:
        raise ValueError("reviewkd_hcl_loss needs at least one level")
    total = None
    for fs, ft in zip(student_feats, teacher_feats):
        fs = upcast(fs)
        ft = upcast(ft).detach()
        _same_shape(fs, ft, "reviewkd_hcl_loss")
        h = fs.shape[2]
        level = _mse(fs, ft)
        norm = 1.0
        w = 1.0
        for l in pool_sizes:
            if l >= h:
                continue
            w = w / 2.0
            level = level + w * _mse(F.adaptive_avg_pool2d(fs, (l, l)),
                                     F.adaptive_avg_pool2d(ft, (l, l)))
            norm += w
        level = level / norm
        total = level if total is None else total + level
    return total
