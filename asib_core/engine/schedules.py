"""Per-epoch schedules: temperature, KD warm-up, learning rate.

All are functions of the GLOBAL student epoch (they do not restart per stage, unlike
the reference code, W-B-3):

- ``tau``: ``tau_start``/``tau_end`` (both set; the baselines' method files), else
  ``tau_schedule: [t0, t1]``: linear from start at the first student epoch to end at the
  last; else the constant ``tau``. One of tau_start/tau_end without the other is refused.
- ``kd_ramp``: ``min(1, (epoch + 1) / kd_warmup_epochs)``; 1 without warm-up.
- paper warm-ups (DKD, ReviewKD) are given in epochs of the reference 240-epoch schedule and
  kept as the same share of the run (``scaled_warmup_epochs``).
- learning rate: linear warm-up over ``schedule.lr_warmup_epochs`` epochs to the base
  LR, then ``cosine`` to ``schedule.min_lr`` or ``step`` (x gamma every step_size
  epochs, floored at min_lr), or ``none``. Implemented as a LambdaLR stepped once per
  epoch, so it is checkpointable.
"""
from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from asib_core.config.errors import ConfigError


def linear(start: float, end: float, epoch: int, total: int) -> float:
    if total <= 1:
        return float(start)
    return float(start + (end - start) * min(epoch, total - 1) / (total - 1))


def tau_for_epoch(cfg: dict, epoch: int, total_epochs: int) -> float:
    start, end = cfg.get("tau_start"), cfg.get("tau_end")
    if (start is None) != (end is None):
        raise ConfigError(f"tau_start={start} and tau_end={end}: set both (a linear temperature "
                          "schedule) or neither.")
    if start is not None:
        return linear(float(start), float(end), epoch, total_epochs)
    sched = cfg.get("tau_schedule")
    if sched:
        if len(sched) != 2:
            raise ConfigError(f"tau_schedule must be [start, end], got {sched}.")
        return linear(float(sched[0]), float(sched[1]), epoch, total_epochs)
    return float(cfg.get("tau", 4.0))


#: length of the reference CIFAR schedule in which the papers give their warm-ups (kd-reference.md)
REFERENCE_EPOCHS = 240


def linear_warmup(epoch: int, length: int) -> float:
    """``min(1, (epoch + 1) / length)`` for the 0-based global epoch; 1 when ``length <= 0``."""
    return 1.0 if length <= 0 else min(1.0, (int(epoch) + 1) / length)


def scaled_warmup_epochs(reference_epochs: int, total_epochs: int) -> int:
    """A warm-up of ``reference_epochs`` epochs of the reference 240-epoch schedule as the same
    share of a ``total_epochs`` run: ``max(1, ceil(reference_epochs * total / 240))`` (a run of
    at least one epoch; 0 when ``reference_epochs`` is 0, i.e. no warm-up)."""
    if int(reference_epochs) <= 0:
        return 0
    total = max(int(total_epochs), 1)
    return max(1, -(-total * int(reference_epochs) // REFERENCE_EPOCHS))  # integer ceil


def kd_ramp(cfg: dict, epoch: int) -> float:
    return linear_warmup(epoch, int(cfg.get("kd_warmup_epochs") or 0))


def lr_multiplier(schedule: dict, base_lr: float, total_epochs: int):
    """epoch -> multiplier of the base LR (warm-up then cosine/step/none)."""
    kind = str(schedule.get("type", "cosine"))
    warm = int(schedule.get("lr_warmup_epochs") or 0)
    floor = float(schedule.get("min_lr") or 0.0) / base_lr if base_lr > 0 else 0.0
    if kind not in ("cosine", "step", "none"):
        raise ConfigError(f"schedule.type='{kind}' is not known; use cosine, step or none.")
    step_size = int(schedule.get("step_size") or 30)
    gamma = float(schedule.get("gamma") if schedule.get("gamma") is not None else 0.1)

    def mult(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        if kind == "none":
            return 1.0
        after = epoch - warm
        if kind == "step":
            return max(floor, gamma ** (after // step_size))
        span = max(1, total_epochs - warm)
        cos = 0.5 * (1.0 + math.cos(math.pi * min(after, span) / span))
        return floor + (1.0 - floor) * cos

    return mult


def build_epoch_scheduler(optimizer, schedule: dict, total_epochs: int) -> LambdaLR:
    base = max(group["lr"] for group in optimizer.param_groups) or 1.0
    return LambdaLR(optimizer, lr_multiplier(schedule, base, total_epochs))


def loss_clamp(loss, cfg: dict, epoch: int):
    """Soft (scale value and gradient to the cap) or hard clamp of the total loss."""
    if not cfg.get("use_loss_clamp") or epoch < int(cfg.get("loss_clamp_warmup_epochs") or 0):
        return loss, False
    cap = float(cfg.get("loss_clamp_max", 100.0))
    value = float(loss.detach())
    if value <= cap:
        return loss, False
    if cfg.get("loss_clamp_mode", "soft") == "hard":
        return loss.clamp(max=cap), True
    return loss * (cap / (value + 1e-8)), True


def kd_cap(losses: dict, cfg: dict, epoch: int, weights: tuple[float, float]) -> tuple[dict, float]:
    """``kd_max_ratio`` r (spec 3.6.7): after ``kd_warmup_epochs`` the ``kd`` term is scaled by
    ``min(1, r * CE_raw / KD_raw)``, comparing the raw (unweighted) terms, the factor computed on
    detached values (floors 1e-6). ``weights = (ce_weight, kd_weight)`` are the weights the
    distiller applied (``ce_alpha``, ``kd_alpha * kd_ramp``): ``CE_raw = ce / ce_weight``,
    ``KD_raw = kd / kd_weight``. Returns the losses and the factor applied (1.0 = untouched)."""
    ratio = cfg.get("kd_max_ratio")
    if ratio is None or "kd" not in losses or "ce" not in losses:
        return losses, 1.0
    if epoch + 1 <= int(cfg.get("kd_warmup_epochs") or 0):
        return losses, 1.0
    ce_weight, kd_weight = (float(w) for w in weights)
    if ce_weight <= 0 or kd_weight <= 0:
        return losses, 1.0
    kd = float(losses["kd"].detach()) / kd_weight
    ce = float(losses["ce"].detach()) / ce_weight
    factor = min(1.0, float(ratio) * max(ce, 1e-6) / max(kd, 1e-6))
    if factor < 1.0:
        losses = dict(losses)
        losses["kd"] = losses["kd"] * factor
    return losses, factor
