"""One call from an experiment name + overrides to a finalised, checked, locked config."""
from __future__ import annotations

from dataclasses import dataclass, field

from .effective import build_effective
from .finalize import finalize_config
from .lock import ConfigLock
from .reference import check_against_reference


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
    """compose -> flatten/promote -> finalize -> reference check -> lock.

    ``for_run=False`` (printing a config) reports planned keys as notes instead of refusing.
    """
    cfg = finalize_config(build_effective(exp, list(overrides)))
    notes = check_against_reference(cfg, for_run=for_run)
    lock = ConfigLock(cfg)
    cfg["config_sha256"] = lock.sha256
    return ResolvedConfig(exp=exp, cfg=cfg, lock=lock, notes=notes)
