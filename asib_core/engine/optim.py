"""Optimisers for the student (B-step) and for fine-tuning."""
from __future__ import annotations

import logging

import torch

from asib_core.config.errors import ConfigError

log = logging.getLogger(__name__)


def build_optimizer(kind: str, groups: list[dict], *, lr: float, weight_decay: float,
                    momentum: float = 0.9, nesterov: bool = True) -> torch.optim.Optimizer:
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("nothing to train: every parameter is frozen.")
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               weight_decay=weight_decay)
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.999), eps=1e-8)
    if kind == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer='{kind}' is not known; use sgd or adamw.")


def _or(value, default):
    return default if value is None else value


def student_optimizer(cfg: dict, student_params, aux_params) -> torch.optim.Optimizer:
    """B-step optimiser. Auxiliary modules (regressors, connectors, ...) use
    ``b_step_lr``/``b_step_weight_decay`` under SGD (null: the student's value), the student's
    values under AdamW."""
    kind = str(cfg.get("optimizer", "adamw"))
    lr, wd = float(cfg["student_lr"]), float(cfg.get("student_weight_decay", 0.0))
    groups = [{"params": list(student_params), "name": "student"}]
    aux = list(aux_params)
    if aux:
        if kind == "sgd":
            groups.append({"params": aux, "name": "auxiliary",
                           "lr": float(_or(cfg.get("b_step_lr"), lr)),
                           "weight_decay": float(_or(cfg.get("b_step_weight_decay"), wd))})
        else:
            groups.append({"params": aux, "name": "auxiliary"})
    elif kind == "sgd":
        inert = [f"{k}={cfg[k]!r}" for k in ("b_step_lr", "b_step_weight_decay") if cfg.get(k) is not None]
        if inert:
            log.warning("%s: no effect, this method has no auxiliary trainable modules in the B-step (the keys "
                        "set their parameter group); the student trains with student_lr=%g, "
                        "student_weight_decay=%g.", " and ".join(inert), lr, wd)
    return build_optimizer(kind, groups, lr=lr, weight_decay=wd,
                           momentum=float(cfg.get("b_step_momentum", 0.9)),
                           nesterov=bool(cfg.get("b_step_nesterov", True)))
