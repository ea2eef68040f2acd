"""Helpers of the crd / reviewkd / simkd / sskd methods (private module, not a method).

Shape probing for methods that build auxiliary modules, and the choice of the teachers a
training step has to run (feature terms read teacher ``kd_teacher_index``; logit terms follow
``kd_target``; a teacher no term reads is not run).

``probe_shapes(model)`` (from ``_baseline_kd``) gives the shape of every entry of a model's
feature dict, which is what CRD / ReviewKD / SimKD / SSKD use to size their extra modules.
"""
from __future__ import annotations

import torch

from asib_core.config.errors import ConfigError

from ._baseline_kd import probe_shapes  # noqa: F401 - the one shape probe of every method
from .targets import LOGIT_TARGETS, selected_teacher


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


def needed_teachers(cfg: dict, n_teachers: int, method: str, logit_term: bool) -> tuple[int, set[int]]:
    """(feature teacher index, indices of every teacher a step must run) for a method with
    a feature term on teacher ``kd_teacher_index`` and, when ``logit_term``, a KD term."""
    t_index = selected_teacher(cfg, n_teachers)
    needed = {t_index}
    if logit_term:
        check_logit_target(cfg, method)
        needed |= logit_teachers(cfg, n_teachers)
    return t_index, needed


def teacher_logits(outs: list[dict | None]) -> list[torch.Tensor | None]:
    return [None if out is None else out["logit"] for out in outs]
