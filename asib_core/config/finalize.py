"""``finalize_config``: derive every derived key before the lock (decisions.md).

Runs once, on the effective config, before hashing. Derivations that need data or
models (``num_classes`` of an image folder, ``ib_mbm_query_dim`` from a backbone's
pooled width) are finished later through :func:`finalize_with_runtime` with the
values measured then; both of those keys are outside the hash by the seed's rule.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .casting import cast_numbers
from .compose import config_dir
from .effective import check_anchor
from .errors import ConfigError

KNOWN_NUM_CLASSES = {"cifar100": 100, "cifar10": 10, "imagenet32": 1000, "digits": 10}
SMALL_STUDENT_MARKERS = ("mobilenet_v2", "efficientnet_b0", "shufflenet_v2")
SMALL_DISTILL_DIM = 256
FREEZE_ROLES = ("student", "teacher1", "teacher2")


def project_defaults() -> dict:
    """Defaults for keys that the seed configs leave unset (configs/project_defaults.yaml)."""
    path = Path(config_dir()) / "project_defaults.yaml"
    return cast_numbers(OmegaConf.to_container(OmegaConf.load(path), resolve=True))


def fill_missing(target: dict, defaults: dict) -> None:
    for key, value in defaults.items():
        if key not in target or (target[key] is None and isinstance(value, dict)):
            target[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            fill_missing(target[key], value)


def is_small_student(name: str) -> bool:
    return any(marker in (name or "") for marker in SMALL_STUDENT_MARKERS)


def _derive_schedule(cfg: dict) -> None:
    epochs = cfg.get("student_epochs_per_stage")
    if isinstance(epochs, int):
        epochs = [epochs] * int(cfg.get("num_stages") or 1)
    epochs = list(epochs or [])
    stages = int(cfg.get("num_stages") or len(epochs) or 1)
    if len(epochs) == 1 and stages > 1:
        epochs = epochs * stages
    if len(epochs) != stages:
        raise ConfigError(
            f"num_stages={stages} but student_epochs_per_stage has {len(epochs)} entries "
            f"({epochs}). Give one epoch count per stage, e.g. "
            f"experiment.student_epochs_per_stage=[{','.join(['10'] * stages)}]."
        )
    if any(int(e) < 0 for e in epochs):
        raise ConfigError(f"student_epochs_per_stage must be >= 0, got {epochs}.")
    cfg["num_stages"] = stages
    cfg["student_epochs_per_stage"] = [int(e) for e in epochs]


def _derive_freeze(cfg: dict) -> None:
    for role in FREEZE_ROLES:
        key = f"{role}_freeze_level"
        if cfg.get(key) is None:
            cfg[key] = -1
        if not cfg.get("use_partial_freeze"):
            continue
        sched = cfg.get(f"{key}_schedule")
        if sched is not None and len(sched) != cfg["num_stages"]:
            raise ConfigError(
                f"{key}_schedule has {len(sched)} entries but num_stages={cfg['num_stages']}; "
                "give one freeze level per stage (-1 = nothing frozen)."
            )


def _derive_dims(cfg: dict) -> None:
    student = (cfg.get("model") or {}).get("student") or {}
    if not cfg.get("use_distillation_adapter"):
        return
    dim = cfg.get("distill_out_dim")
    if (dim is None or int(dim) <= 0) and is_small_student(student.get("name", "")):
        cfg["distill_out_dim"] = SMALL_DISTILL_DIM
    dim = cfg.get("distill_out_dim")
    if dim is not None and int(dim) > 0:
        cfg["ib_mbm_out_dim"] = int(dim)
        if cfg.get("feat_kd_key", "distill_feat") == "distill_feat":
            cfg["ib_mbm_query_dim"] = int(dim)


def _derive_teacher_optim(cfg: dict) -> None:
    if not cfg.get("teacher_lr") and cfg.get("a_step_lr"):
        cfg["teacher_lr"] = cfg["a_step_lr"]
    if not cfg.get("teacher_weight_decay") and cfg.get("a_step_weight_decay"):
        cfg["teacher_weight_decay"] = cfg["a_step_weight_decay"]


def _check_small_input(cfg: dict) -> None:
    top, ds = cfg.get("small_input"), cfg.get("dataset", {}).get("small_input")
    if top is not None and ds is not None and bool(top) != bool(ds):
        raise ConfigError(
            f"small_input={top} but dataset.small_input={ds}: the model stems and the dataset's "
            "image size disagree; set both to the same value."
        )


def _check_cccp(cfg: dict) -> None:
    for key in ("cccp_nt", "cccp_ns"):
        if int(cfg.get(key, 1)) != 1:
            raise ConfigError(
                f"{key}={cfg[key]} is not supported: CCCP runs one inner step per outer "
                f"step; only {key}=1 is implemented. Remove the override or set {key}=1."
            )


def finalize_config(cfg: dict) -> dict:
    """Fill defaults and derived keys, validate; returns a new dict."""
    cfg = cast_numbers(copy.deepcopy(cfg))
    fill_missing(cfg, project_defaults())
    dataset = cfg.setdefault("dataset", {})
    if cfg.get("num_classes") is None:
        cfg["num_classes"] = KNOWN_NUM_CLASSES.get(dataset.get("name"))
    _check_small_input(cfg)
    _derive_schedule(cfg)
    _derive_freeze(cfg)
    _derive_dims(cfg)
    _derive_teacher_optim(cfg)
    _check_cccp(cfg)
    check_anchor(cfg)
    return cfg


def finalize_with_runtime(cfg: dict, **measured: Any) -> dict:
    """Record values known only once data/models exist (all outside the hash)."""
    allowed = {"num_classes", "ib_mbm_query_dim", "ib_mbm_out_dim", "teacher1_ckpt", "teacher2_ckpt"}
    unknown = set(measured) - allowed
    if unknown:
        raise ValueError(f"finalize_with_runtime may set only {sorted(allowed)}, got {sorted(unknown)}")
    cfg.update(measured)
    return cfg
