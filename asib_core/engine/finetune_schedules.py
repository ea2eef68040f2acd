"""Learning-rate schedules of the teacher fine-tune recipes (``scheduler_type``).

Every schedule warms up linearly over ``warmup_epochs`` epochs TO the nominal peak
``finetune_lr`` (epoch 0 trains at lr/(W+1), never at 0), and milestones/periods count
from the start of training (they are not shifted by the warm-up):

- ``cosine``: cosine from the peak to ``min_lr`` over the epochs after warm-up;
- ``multistep``: x ``lr_gamma`` at each of ``lr_milestones`` (default [E/3, 2E/3], 0.1);
- ``cosine_warm_restarts``: SGDR with period ``restart_period`` (E/3) growing by the
  integer factor ``restart_multiplier`` (2), floor ``min_lr``;
- ``reduce_on_plateau``: after warm-up, x0.5 when validation accuracy has not improved
  for 5 epochs, floor ``min_lr``;
- ``onecycle``: OneCycle per batch (peak ``finetune_lr``, warm-up share
  ``warmup_epochs / finetune_epochs`` or 0.1, cosine annealing).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim.lr_scheduler import LambdaLR, OneCycleLR, ReduceLROnPlateau

from asib_core.config.errors import ConfigError

KNOWN = ("cosine", "multistep", "cosine_warm_restarts", "reduce_on_plateau", "onecycle")


@dataclass
class Schedulers:
    epoch: object = None       # stepped once per epoch
    plateau: object = None     # stepped with the validation accuracy
    batch: object = None       # stepped once per batch


def _restart_multiplier(cfg: dict) -> int:
    value = cfg.get("restart_multiplier", 2)
    if isinstance(value, bool) or float(value) != int(float(value)) or int(float(value)) < 1:
        raise ConfigError(
            f"restart_multiplier={value} is invalid: cosine_warm_restarts grows each period by an "
            "integer factor >= 1 (1 = equal periods, 2 = doubling). Set restart_multiplier=1 or 2."
        )
    return int(float(value))


def _sgdr(epoch: int, period: int, mult: int) -> tuple[int, int]:
    """(position inside the current period, its length)."""
    while epoch >= period:
        epoch -= period
        period *= mult
    return epoch, period


def build_finetune_schedulers(optimizer, cfg: dict, steps_per_epoch: int) -> Schedulers:
    kind = str(cfg.get("scheduler_type", "cosine"))
    if kind not in KNOWN:
        raise ConfigError(f"scheduler_type='{kind}' is not known; use one of {', '.join(KNOWN)}.")
    epochs = int(cfg["finetune_epochs"])
    lr = float(cfg["finetune_lr"])
    warm = int(cfg.get("warmup_epochs") or 0)
    floor = float(cfg.get("min_lr") or 0.0) / lr if lr > 0 else 0.0
    if kind == "onecycle":
        pct = warm / epochs if warm and epochs else 0.1
        return Schedulers(batch=OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch),
                                           pct_start=min(max(pct, 1e-3), 0.999), anneal_strategy="cos"))
    milestones = cfg.get("lr_milestones") or [epochs // 3, 2 * epochs // 3]
    gamma = float(cfg.get("lr_gamma") if cfg.get("lr_gamma") is not None else 0.1)
    period = int(cfg.get("restart_period") or max(1, epochs // 3))
    mult = _restart_multiplier(cfg) if kind == "cosine_warm_restarts" else 1

    def factor(epoch: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        if kind == "cosine":
            span = max(1, epochs - warm)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(epoch - warm, span) / span))
        if kind == "multistep":
            return gamma ** sum(1 for m in milestones if epoch >= int(m))
        if kind == "cosine_warm_restarts":
            pos, length = _sgdr(epoch, period, mult)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * pos / length))
        return 1.0  # reduce_on_plateau: warm-up only, then the plateau rule

    if kind == "reduce_on_plateau":
        return Schedulers(epoch=_WarmupOnly(LambdaLR(optimizer, factor), warm),
                          plateau=_WarmPlateau(optimizer, warm, float(cfg.get("min_lr") or 0.0)))
    return Schedulers(epoch=LambdaLR(optimizer, factor))


class _WarmupOnly:
    """Steps the warm-up LambdaLR during warm-up only, so plateau reductions stick."""

    def __init__(self, inner: LambdaLR, warmup: int):
        self.inner, self.warmup = inner, warmup

    def step(self) -> None:
        if self.inner.last_epoch < self.warmup:
            self.inner.step()

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


class _WarmPlateau:
    """ReduceLROnPlateau that starts after the warm-up epochs (checkpointable)."""

    def __init__(self, optimizer, warmup: int, min_lr: float):
        self.inner = ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=5, min_lr=min_lr)
        self.warmup = warmup
        self.seen = 0

    def step(self, value: float) -> None:
        self.seen += 1
        if self.seen > self.warmup:
            self.inner.step(value)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self.seen = int(state["seen"])
