"""The config lock: SHA-256 over the sanitised effective config (seed note, decisions.md).

``sanitize`` drops exactly the seed's ignore list (single keys and prefixes, top
level only); nested dicts (dataset, schedule, model, teacher1, anchor ...) are kept
whole. The hash is SHA-256 of ``json.dumps(..., sort_keys=True)`` (default
separators, non-JSON values stringified). ``ConfigLock.verify(cfg, stage)`` re-hashes
the live config and raises :class:`ConfigLockError` naming every changed key.

Because the ignore list leaves out keys that change results (``optimizer``,
``use_amp``, ``student_epochs_per_stage`` through the ``student_ep*`` prefix, the
teacher checkpoints), run reuse uses :func:`identity_hash`, which keeps them (and adds the
version of the code).
"""
from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from .casting import cast_numbers
from .errors import ConfigLockError

IGNORED_KEYS = frozenset({
    "config_sha256", "locked", "use_amp", "teacher1_ckpt", "teacher2_ckpt",
    "ib_mbm_out_dim", "ib_mbm_query_dim", "auto_align_ib_out_dim", "_locked_config",
    "csv_filename", "total_time_sec", "final_student_acc", "last_synergy_acc",
    "last_synergy_acc_pct", "kd_gate_on", "optimizer", "hydra_method", "cur_stage",
    "effective_teacher_lr", "effective_teacher_wd", "num_classes",
})
IGNORED_PREFIXES = ("student_ep", "teacher_ep", "epoch", "csv_")
VERIFY_STAGES = ("before_run", "before_safe_retry", "after_run")

# Keys the lock ignores but that are pure run bookkeeping: the only ones that run
# identity (reuse) may also ignore. Everything else the lock ignores changes results.
BOOKKEEPING_KEYS = frozenset({
    "config_sha256", "locked", "_locked_config", "csv_filename", "total_time_sec",
    "final_student_acc", "last_synergy_acc", "last_synergy_acc_pct", "kd_gate_on",
    "hydra_method", "cur_stage",
})


def is_ignored(key: str) -> bool:
    return key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES)


def sanitize(cfg: dict) -> dict:
    clean = cast_numbers(copy.deepcopy(cfg))
    return {k: v for k, v in clean.items() if not is_ignored(k)}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def sha256_of(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def config_hash(cfg: dict) -> str:
    return sha256_of(sanitize(cfg))


def identity_hash(cfg: dict, extra: dict | None = None) -> str:
    """Hash for run reuse: the config minus bookkeeping, plus ``extra`` (e.g. the
    content hashes of the teacher checkpoints actually used), plus the version of the code
    (:func:`asib_core.code_version.code_version`): a run of other code is never reused."""
    from asib_core.code_version import code_version

    clean = cast_numbers(copy.deepcopy(cfg))
    body = {k: v for k, v in clean.items()
            if k not in BOOKKEEPING_KEYS and not k.startswith("csv_")}
    return sha256_of({"config": body, "extra": extra or {}, "code": code_version()})


def flatten(obj: Any, prefix: str = "") -> dict:
    """Nested dict -> {dotted.key: leaf}; lists stay leaves."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict = {}
    for key, value in sorted(obj.items()):  # items(): a walk over every key, not a lookup of one
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def diff_flat(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    missing = object()
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            changes.append((key, "<absent>" if a is missing else a,
                            "<absent>" if b is missing else b))
    return changes


class ConfigLock:
    """Locks an effective config; ``verify`` proves it has not been mutated."""

    def __init__(self, cfg: dict):
        self._locked = sanitize(cfg)
        self.sha256 = sha256_of(self._locked)

    def verify(self, cfg: dict, stage: str) -> str:
        if stage not in VERIFY_STAGES:
            raise ValueError(f"unknown lock verification stage {stage!r}; use one of {VERIFY_STAGES}")
        live = sanitize(cfg)
        live_hash = sha256_of(live)
        if live_hash != self.sha256:
            raise ConfigLockError(stage, self.sha256, live_hash,
                                  diff_flat(flatten(self._locked), flatten(live)))
        return live_hash
