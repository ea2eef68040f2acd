"""One call from an experiment name + overrides to a finalised, checked, locked config."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from .effective import build_effective
from .finalize import fill_missing, finalize_config, project_defaults
from .lock import ConfigLock
from .validate import config_problems, refuse


@dataclass
class ResolvedConfig:
    exp: str
    cfg: dict
    lock: ConfigLock
    notes: list = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return self.lock.sha256


def resolve_experiment(exp: str, overrides=(), *, for_run: bool = True) -> ResolvedConfig:
    """compose -> flatten/promote -> validate -> finalize -> validate -> lock.

    The validator (``asib_core/config/validate.py``) runs twice: on the effective config with
    the project defaults filled in, before any derivation (a value such as ``num_stages=0`` or
    ``num_stages=abc`` is refused as given, not derived around or crashed on), and on the
    finalised config (the derived keys). Every problem found is reported in one paragraph.
    ``for_run=False`` (printing a config) reports planned keys as notes instead of refusing.
    """
    effective = build_effective(exp, list(overrides))
    given = copy.deepcopy(effective)
    fill_missing(given, project_defaults())
    problems, _ = config_problems(given, for_run=for_run)
    context = f"experiment '{exp}'"
    if problems:
        refuse(problems, "run", context)
    cfg = finalize_config(effective)
    problems, notes = config_problems(cfg, for_run=for_run)
    refuse(problems, "run", context)
    lock = ConfigLock(cfg)
    cfg["config_sha256"] = lock.sha256
    return ResolvedConfig(exp=exp, cfg=cfg, lock=lock, notes=notes)
