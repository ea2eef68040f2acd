"""The one epoch loop every step uses (fine-tune, pre-training stages, A-step, B-step).

``train_epoch`` drives a *step function* ``step(batch) -> (logits, {name: loss})``:
it mixes the batch (Mixup/CutMix), sums the named losses, clamps, back-propagates (then
calls ``after_backward``, e.g. a gradient all-reduce), clips, steps the optimiser and
accumulates per-epoch means. A non-finite loss raises
:class:`NonFiniteLoss` (SAFE-RETRY catches it). ``evaluate`` runs a model function
over a loader without gradients.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from asib_core.data.mixing import mix_batch
from asib_core.contract import Batch

from .amp import Precision, autocast_for
from .progress import EpochProgress
from .schedules import loss_clamp


class NonFiniteLoss(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochSettings:
    epoch: int
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    grad_clip_norm: float = 0.0
    clamp_cfg: dict = field(default_factory=dict)
    seed: int = 0
    desc: str = "train"
    inject_nonfinite_at: int | None = None  # test hook: poison this batch's loss


def distill_mixing(cfg: dict) -> tuple[float, float]:
    """The distillation batches' (Mixup alpha, CutMix alpha): ``mixup_alpha`` and
    ``cutmix_alpha_distill``, 0 when unset (no mixing)."""
    return float(cfg.get("mixup_alpha") or 0.0), float(cfg.get("cutmix_alpha_distill") or 0.0)


@dataclass
class EpochResult:
    metrics: dict
    images: int
    seconds: float


def _mix_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + epoch * 7919 + 17) % (2 ** 63))
    return gen


EPOCH_STATS = ("loss", "acc", "clamp_ratio", "img_per_s", "epoch_time")   # train_epoch's metrics that are not loss terms


def clamp_binding_message(metrics: dict, cfg: dict, epoch: int) -> str | None:
    """A warning when the loss clamp bound on every batch of an epoch (``metrics`` from
    ``train_epoch``; its other entries are the per-term means the total summed), else None.
    Then the clamp no longer caps outliers: it scales every gradient by about max / loss, like a
    lower learning rate, and the term that put the loss there is usually a weight on the wrong scale."""
    if metrics.get("clamp_ratio", 0.0) < 1.0:
        return None
    terms = {k: float(v) for k, v in metrics.items() if k not in EPOCH_STATS}
    total = sum(terms.values())
    cap = float(cfg.get("loss_clamp_max", 100.0))
    largest = max(terms, key=terms.get)   # a clamped epoch has a positive total, so a term
    return (f"loss clamp: every batch of epoch {epoch + 1} was over loss_clamp_max={cap:g} (mean loss "
            f"before the clamp {total:.4g}), so every gradient was scaled by about {cap / total:.2f} "
            f"(loss_clamp_mode={cfg.get('loss_clamp_mode', 'soft')}); the largest term is "
            f"{largest} ({terms[largest]:.4g}). If that is not intended, lower that "
            f"term's weight or raise loss_clamp_max.")


def train_epoch(step: Callable, loader, optimizer, params, precision: Precision,
                settings: EpochSettings, reducer=None, scheduler_per_batch=None,
                after_backward: Callable | None = None) -> EpochResult:
    sums: dict[str, float] = {}
    correct = seen = clamped = 0
    start = time.perf_counter()
    mix_gen = _mix_generator(settings.seed, settings.epoch, loader.device)
    progress = EpochProgress(len(loader), settings.desc)
    for i, (x, y, idx) in enumerate(loader):
        mixed = mix_batch(x, y, mixup_alpha=settings.mixup_alpha,
                          cutmix_alpha=settings.cutmix_alpha, generator=mix_gen)
        batch = Batch(x=mixed.x, y=mixed.y_a, idx=idx, y_b=mixed.y_b, lam=float(mixed.lam),
                      x_clean=x if mixed.perm is not None else None, perm=mixed.perm)
        with precision.autocast():
            logits, losses = step(batch)
        total = sum(v.float() for v in losses.values())
        if settings.inject_nonfinite_at is not None and i == settings.inject_nonfinite_at:
            total = total * float("nan")
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"non-finite loss at batch {i} of epoch {settings.epoch}: "
                                + ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in losses.items()))
        total, was_clamped = loss_clamp(total, settings.clamp_cfg, settings.epoch)
        clamped += int(was_clamped)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(total).backward()
        if after_backward is not None:
            after_backward()
        if settings.grad_clip_norm and settings.grad_clip_norm > 0:
            precision.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip_norm)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        if scheduler_per_batch is not None:
            scheduler_per_batch.step()
        n = int(y.shape[0])
        seen += n
        sums["loss"] = sums.get("loss", 0.0) + float(total.detach()) * n
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
        correct += int((logits.detach().argmax(1) == y).sum())
        progress.update(n, sums["loss"] / seen, correct / seen)
    progress.close()
    seconds = time.perf_counter() - start
    totals = torch.tensor([seen, correct, clamped, len(loader)] + [sums[k] for k in sorted(sums)],
                          dtype=torch.float64)
    if reducer is not None:
        totals = reducer(totals)   # summed over ranks: the batch count too, so the ratio stays in [0, 1]
    seen, correct, clamped, batches = (int(v) for v in totals[:4])
    metrics = {k: float(v) / max(seen, 1) for k, v in zip(sorted(sums), totals[4:].tolist())}
    metrics["acc"] = correct / max(seen, 1)
    metrics["clamp_ratio"] = clamped / max(batches, 1)
    metrics["img_per_s"] = seen / seconds if seconds > 0 else math.nan
    metrics["epoch_time"] = seconds
    return EpochResult(metrics=metrics, images=seen, seconds=seconds)


@torch.no_grad()
def evaluate(model_fn: Callable, loader, precision: Precision | None = None, reducer=None) -> dict:
    """Top-1 accuracy and mean cross-entropy of ``model_fn(x) -> logits`` over a loader."""
    correct = seen = 0
    loss_sum = 0.0
    for x, y, _ in loader:
        with autocast_for(precision):
            logits = model_fn(x)
        logits = logits.float()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += int(y.shape[0])
    totals = torch.tensor([seen, correct, loss_sum], dtype=torch.float64)
    if reducer is not None:
        totals = reducer(totals)
    seen = max(int(totals[0]), 1)
    return {"acc": float(totals[1]) / seen, "loss": float(totals[2]) / seen}


@torch.no_grad()
def collect_logits(model_fn: Callable, loader, precision: Precision | None = None):
    """All logits and labels of a loader (for evaluation reports)."""
    outs, labels = [], []
    for x, y, _ in loader:
        with autocast_for(precision):
            outs.append(model_fn(x).float().cpu())
        labels.append(y.cpu())
    return torch.cat(outs), torch.cat(labels)
