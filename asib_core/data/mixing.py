"""Mixup and CutMix as whole-batch operations, plus the matching cross-entropy.

Rules (one draw per batch, all randomness from the given CPU ``torch.Generator``):

* choice: both alphas 0 -> the batch is returned unchanged (``lam = 1``, ``mode = "none"``);
  only one alpha > 0 -> that method; both > 0 -> CutMix with probability 0.5, else Mixup
  (the per-batch switch of timm's ``Mixup`` with ``switch_prob=0.5``);
* ``lam ~ Beta(alpha, alpha)`` of the chosen method; the partner of sample i is
  ``perm[i]`` for a random permutation ``perm`` of the batch;
* Mixup: ``x = lam * x + (1 - lam) * x[perm]``;
* CutMix: a box of height ``int(H * sqrt(1 - lam))`` and width ``int(W * sqrt(1 - lam))``
  centred on a uniform random pixel, clipped to the image, is pasted from ``x[perm]``;
  ``lam`` is then recomputed as ``1 - box_area / (H * W)`` (the true share of the original
  image);
* targets: ``y_a = y``, ``y_b = y[perm]``; the loss is
  ``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)``.

The input batch is never modified in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MixedBatch:
    x: torch.Tensor
    y_a: torch.Tensor
    y_b: torch.Tensor
    lam: float
    mode: str = "none"  # "none" | "mixup" | "cutmix"
    perm: torch.Tensor | None = None
    box: tuple[int, int, int, int] | None = None  # (y1, y2, x1, x2), CutMix only


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator, dtype=torch.float64))


def _normal(generator: torch.Generator | None) -> float:
    return float(torch.randn((), generator=generator, dtype=torch.float64))


def sample_gamma(alpha: float, generator: torch.Generator | None = None) -> float:
    """One draw of Gamma(alpha, 1) (Marsaglia and Tsang, 2000; boost for alpha < 1)."""
    if alpha <= 0:
        raise ValueError("alpha must be > 0")
    if alpha < 1.0:
        u = _uniform(generator)
        return sample_gamma(alpha + 1.0, generator) * u ** (1.0 / alpha)
    d = alpha - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        z = _normal(generator)
        v = (1.0 + c * z) ** 3
        if v <= 0:
            continue
        u = _uniform(generator)
        if u > 0 and math.log(u) < 0.5 * z * z + d - d * v + d * math.log(v):
            return d * v


def sample_beta(alpha: float, beta: float, generator: torch.Generator | None = None) -> float:
    """One draw of Beta(alpha, beta) as ``X / (X + Y)`` with independent Gamma draws."""
    x = sample_gamma(alpha, generator)
    y = sample_gamma(beta, generator)
    return x / (x + y) if x + y > 0 else 0.5


def cutmix_box(
    height: int, width: int, lam: float, generator: torch.Generator | None = None
) -> tuple[int, int, int, int]:
    """``(y1, y2, x1, x2)`` of a CutMix box for ``lam`` (side ratio ``sqrt(1 - lam)``), clipped."""
    ratio = math.sqrt(max(0.0, 1.0 - lam))
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(0, height, (), generator=generator))
    cx = int(torch.randint(0, width, (), generator=generator))
    y1, x1 = cy - cut_h // 2, cx - cut_w // 2
    y2, x2 = y1 + cut_h, x1 + cut_w
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return clip(y1, height), clip(y2, height), clip(x1, width), clip(x2, width)


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator | None = None,
) -> MixedBatch:
    """Apply Mixup or CutMix to a batch ``x [B,C,H,W]``, ``y [B]`` (see module docstring)."""
    mixup_alpha, cutmix_alpha = float(mixup_alpha or 0.0), float(cutmix_alpha or 0.0)
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError("mixup_alpha and cutmix_alpha must be >= 0")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return MixedBatch(x=x, y_a=y, y_b=y, lam=1.0)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = _uniform(generator) < 0.5
    else:
        use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = sample_beta(alpha, alpha, generator)
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device)
    y_b = y.index_select(0, perm)
    partner = x.index_select(0, perm)
    if not use_cutmix:
        mixed = x * lam + partner * (1.0 - lam)
        return MixedBatch(x=mixed, y_a=y, y_b=y_b, lam=lam, mode="mixup", perm=perm)
    h, w = x.shape[-2:]
    y1, y2, x1, x2 = cutmix_box(h, w, lam, generator)
    mixed = x.clone()
    mixed[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
    lam = 1.0 - (y2 - y1) * (x2 - x1) / float(h * w)
    return MixedBatch(x=mixed, y_a=y, y_b=y_b, lam=lam, mode="cutmix", perm=perm, box=(y1, y2, x1, x2))


def mixed_cross_entropy(
    logits: torch.Tensor, mixed: MixedBatch, label_smoothing: float = 0.0
) -> torch.Tensor:
    """``lam * CE(logits, y_a) + (1 - lam) * CE(logits, y_b)`` (mean over the batch)."""
    loss_a = F.cross_entropy(logits, mixed.y_a, label_smoothing=label_smoothing)
    if mixed.lam >= 1.0:
        return loss_a
    loss_b = F.cross_entropy(logits, mixed.y_b, label_smoothing=label_smoothing)
    return mixed.lam * loss_a + (1.0 - mixed.lam) * loss_b
