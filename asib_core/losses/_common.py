"""Shared helpers of the loss package (private).

Conventions used by every loss in :mod:`asib_core.losses`:

* Logits are ``[B, C]`` (batch first, classes last).
* Losses are computed in float32 at least: float16 / bfloat16 inputs are upcast, float64
  inputs stay float64 (the tests use float64).
* ``reduction`` for per-sample losses is one of

  - ``"batchmean"``: mean over the batch of the per-sample value (the KD convention:
    ``KL`` summed over classes, averaged over samples). An empty batch gives 0, not NaN.
  - ``"sum"``: sum over the batch of the per-sample value.
  - ``"none"``: the per-sample vector ``[B]`` (for per-sample weights).

  PyTorch's ``"mean"`` (mean over *all elements*, i.e. also divided by C) is deliberately
  not accepted for distribution losses because it silently shrinks KD by a factor C.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

PER_SAMPLE_REDUCTIONS = ("batchmean", "sum", "none")


def upcast(x: Tensor) -> Tensor:
    """Return ``x`` in float32 if it is a half-precision float, else unchanged."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


def check_temperature(temperature: float, name: str = "temperature") -> float:
    t = float(temperature)
    if not t > 0.0:
        raise ValueError(f"{name} must be > 0, got {temperature!r}")
    return t


def check_reduction(reduction: str, allowed: Sequence[str] = PER_SAMPLE_REDUCTIONS) -> str:
    if reduction not in allowed:
        hint = ""
        if reduction == "mean" and "mean" not in allowed:
            hint = (" ('mean' is ambiguous for distribution losses: use 'batchmean' for the "
                    "mean over samples of the per-sample loss)")
        raise ValueError(f"reduction must be one of {tuple(allowed)}, got {reduction!r}{hint}")
    return reduction


def reduce_per_sample(per_sample: Tensor, reduction: str) -> Tensor:
    """Reduce a per-sample loss vector ``[B]`` according to ``reduction``."""
    check_reduction(reduction)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    # batchmean; an empty batch yields 0 (keeps the graph, avoids NaN)
    return per_sample.sum() / max(per_sample.shape[0], 1)


def kl_rows(q: Tensor, log_q: Tensor, log_p: Tensor) -> Tensor:
    """Per-row ``KL(q || p) = sum_c q_c (log q_c - log p_c)`` over the last dim.

    Entries with ``q_c == 0`` contribute exactly 0 (also when ``log_q`` or ``log_p`` is
    ``-inf``), which keeps masked classes NaN-free.
    """
    terms = q * (log_q - log_p)
    terms = torch.where(q > 0, terms, torch.zeros_like(terms))
    return terms.sum(dim=-1)


def l2_normalize(x: Tensor, dim: int = -1, eps: float = 1e-12) -> Tensor:
    """``x / max(||x||_2, eps)`` along ``dim``."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def stack_teachers(teacher_logits_list) -> Tensor:
    """Accept a sequence of ``[B, C]`` tensors or a ``[K, B, C]`` tensor; return ``[K, B, C]``."""
    if isinstance(teacher_logits_list, Tensor):
        t = teacher_logits_list
        if t.dim() == 2:
            t = t.unsqueeze(0)
        if t.dim() != 3:
            raise ValueError(f"teacher logits must be [K, B, C], got shape {tuple(t.shape)}")
        return upcast(t)
    tl = list(teacher_logits_list)
    if not tl:
        raise ValueError("at least one teacher is required")
    shapes = {tuple(t.shape) for t in tl}
    if len(shapes) != 1:
        raise ValueError(f"all teacher logits must have the same shape, got {sorted(shapes)}")
    return upcast(torch.stack([upcast(t) for t in tl], dim=0))
