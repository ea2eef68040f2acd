"""Helpers of the crd / reviewkd / simkd / sskd methods (private module, not a method).

Shape probing for methods that build auxiliary modules, and the choice of the teachers a
training step has to run (feature terms read teacher ``kd_teacher_index``; logit terms follow
``kd_target``; a teacher no term reads is not run).

``probe_shapes(model)`` runs one dummy ``1x3x32x32`` zero image through a model under
``no_grad`` in eval mode (BatchNorm uses its running statistics, nothing is updated) and puts
the model back in the mode it was in. It returns the shape of every entry of the model's
feature dict, which is what CRD / ReviewKD / SimKD / SSKD use to size their extra modules.
"""
from __future__ import annotations

import torch
from torch import nn

from asib_core.config.errors import ConfigError

from .targets import LOGIT_TARGETS, selected_teacher

PROBE_SIZE = 32


def _device_of(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def probe_shapes(model: nn.Module, size: int = PROBE_SIZE) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` of ``model(zeros(1, 3, size, size))``; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        out = model(torch.zeros(1, 3, size, size, device=_device_of(model)))
    finally:
        model.train(was_training)
    return {key: tuple(value.shape) for key, value in out.items()}


def stage_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Number of ``feat_4d_layer{i}`` entries of a probed feature dict."""
    n = 0
    while f"feat_4d_layer{n + 1}" in shapes:
        n += 1
    return n


# -- which teachers a step needs ---------------------------------------------------------
def check_logit_target(cfg: dict, method: str) -> None:
    """Fail at construction (not at the first batch) on a kd_target a baseline cannot serve."""
    mode = cfg.get("kd_target", "avg")
    if mode not in LOGIT_TARGETS:
        raise ConfigError(f"kd_target='{mode}' needs the ASIB method (method=asib); method "
                          f"'{method}' accepts {', '.join(LOGIT_TARGETS)}.")


def logit_teachers(cfg: dict, n_teachers: int) -> set[int]:
    """Indices of the teachers whose logits ``target_probs`` reads."""
    if n_teachers == 1:
        return {0}
    if cfg.get("kd_target", "avg") == "teacher":
        return {selected_teacher(cfg, n_teachers)}
    return set(range(n_teachers))


@torch.no_grad()
def teacher_forward(teachers, x: torch.Tensor, needed: set[int]) -> list[dict | None]:
    """Frozen teacher outputs for the needed indices (``None`` for the others)."""
    return [teacher(x) if i in needed else None for i, teacher in enumerate(teachers)]


def teacher_logits(outs: list[dict | None]) -> list[torch.Tensor | None]:
    return [None if out is None else out["logit"] for out in outs]
