"""PPF (partial parameter freezing), generic over every model family via ``stage_modules()``.

Levels (``*_freeze_level`` / ``*_freeze_level_schedule``, one level per stage):

* ``-1``: nothing frozen.
* ``k >= 0``: the stem and every backbone stage except the last ``k`` are frozen. What is
  not part of the backbone (the classifier, the distillation adapter, the head dropout)
  stays trainable. So ``0`` = classifier + adapter trainable, ``1`` = the last stage +
  classifier + adapter, ``2`` = the last two stages + classifier + adapter; ``k`` larger
  than the number of stages leaves only the stem frozen.

``freeze_bn`` (``*_freeze_bn``): BatchNorm layers inside the frozen part are kept in eval
mode, so their running statistics stay fixed too (their affine parameters are frozen like
every other frozen parameter). Without it they keep updating their running statistics
whenever the model is in training mode.

The student's level is applied at the start of each stage and kept for that stage's whole
B-step (the student is frozen anyway during the A-step). For teachers, which are frozen in
the B-step, the level limits what the A-step may train (see ``teacher_a_step_params``).
"""
from __future__ import annotations

from torch import nn

from asib_core.config.errors import ConfigError

BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _stage_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not hasattr(model, "stage_modules"):
        raise ConfigError(f"PPF needs a model with stage_modules() (got {type(model).__name__}).")
    return list(model.stage_modules())


def frozen_module_names(model: nn.Module, level: int) -> list[str]:
    """Names (as in ``stage_modules()``) of the backbone parts frozen at ``level``."""
    if level < 0:
        return []
    mods = _stage_modules(model)
    n_stages = len(mods) - 1
    keep = min(int(level), n_stages)
    return [name for name, _ in mods[: 1 + n_stages - keep]]


def frozen_parameter_names(model: nn.Module, level: int) -> set[str]:
    """Fully qualified parameter names of ``model`` frozen at ``level``."""
    names = set(frozen_module_names(model, level))
    module_prefix = {id(m): n for n, m in model.named_modules()}
    out: set[str] = set()
    for name, module in _stage_modules(model):
        if name not in names:
            continue
        prefix = module_prefix.get(id(module), name)
        out.update(f"{prefix}.{p}" if prefix else p for p, _ in module.named_parameters())
    return out


def frozen_batchnorms(model: nn.Module, level: int) -> list[nn.Module]:
    names = set(frozen_module_names(model, level))
    bns: list[nn.Module] = []
    for name, module in _stage_modules(model):
        if name in names:
            bns.extend(m for m in module.modules() if isinstance(m, BN_TYPES))
    return bns


def apply_student_level(model: nn.Module, level: int, freeze_bn: bool) -> list[nn.Module]:
    """Set ``requires_grad`` of every student parameter for ``level``; return the BatchNorm
    modules to keep in eval mode (empty unless ``freeze_bn``)."""
    frozen = frozen_parameter_names(model, level)
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)
    return frozen_batchnorms(model, level) if freeze_bn else []


def teacher_a_step_params(teacher: nn.Module, level: int, *, finetune: bool, adapter_only: bool):
    """Teacher parameters the A-step trains: the base set (all parameters with
    ``use_teacher_finetuning``, the distillation adapter with ``train_distill_adapter_only``,
    none otherwise) minus the part frozen at the PPF ``level``."""
    if finetune:
        base = list(teacher.named_parameters())
    elif adapter_only and getattr(teacher, "distill_adapter", None) is not None:
        base = [(f"distill_adapter.{n}", p) for n, p in teacher.distill_adapter.named_parameters()]
    else:
        return []
    frozen = frozen_parameter_names(teacher, level)
    return [(n, p) for n, p in base if n not in frozen]


def trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}
