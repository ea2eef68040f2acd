"""Build the student and the teachers of a run from the effective config."""
from __future__ import annotations

from pathlib import Path

import torch

from asib_core.config.effective import ASIB_FAMILY
from asib_core.errors import CheckpointError
from asib_core.models import create_model
from asib_core.models.checkpoint import check_shapes, describe_payload, is_state_dict, read_checkpoint


def adapter_dim(cfg: dict, role: str) -> int | None:
    """Distillation adapters exist for ASIB-family methods (the only readers of distill_feat)."""
    if cfg.get("method_name") not in ASIB_FAMILY or not cfg.get("use_distillation_adapter"):
        return None
    if role == "student" and not cfg.get("model", {}).get("student", {}).get("use_adapter", True):
        return None
    dim = cfg.get("distill_out_dim")
    return int(dim) if dim else None


def small_input(cfg: dict) -> bool:
    value = cfg.get("small_input")
    if value is None:
        value = cfg.get("dataset", {}).get("small_input", True)
    return bool(value)


def build_student(cfg: dict, num_classes: int):
    spec = cfg["model"]["student"]
    return create_model(spec["name"], num_classes=num_classes, pretrained=bool(spec.get("pretrained")),
                        small_input=small_input(cfg), pretrained_file=spec.get("pretrained_file"),
                        distill_out_dim=adapter_dim(cfg, "student"))


def save_teacher(model, path: str | Path, meta: dict) -> None:
    from asib_core.engine.state import atomic_save
    atomic_save({"model": model.state_dict(), "meta": meta}, path)


TEACHER_FORMAT = ("a fine-tune checkpoint written by pipelines.finetune: a dict {'model': <state dict>, "
                  "'meta': {'teacher': <model name>, 'num_classes': <int>, ...}}")


def teacher_fix(name: str, role: str) -> str:
    return (f"Point {role}_ckpt at a {name} checkpoint written by `python -m pipelines.finetune "
            f"teacher={name} dataset=...` on this dataset, or fine-tune the teacher first.")


def read_teacher_checkpoint(cfg: dict, role: str, ckpt: str | Path, num_classes: int, *, mmap: bool = False) -> dict:
    """The payload of the checkpoint of teacher ``role`` (see :func:`teacher_payload`)."""
    name = cfg[role]["name"]
    return teacher_payload(ckpt, name, num_classes, f"{role} checkpoint", teacher_fix(name, role), mmap=mmap)


def teacher_payload(ckpt: str | Path, name: str, num_classes: int, what: str, fix: str, *,
                    mmap: bool = False) -> dict:
    """A fine-tune checkpoint's payload, refused (one sentence: what was expected, what was
    found, the fix) when the file does not load, is not a fine-tune checkpoint (a bare state
    dict, a tensor, ...), holds another teacher than ``name`` or was trained for another class
    count. ``mmap``: map the tensors instead of reading them (a cheap check before the file is
    loaded for real)."""
    ckpt = Path(ckpt)
    payload = read_checkpoint(ckpt, what, mmap=mmap)
    if not isinstance(payload, dict) or not is_state_dict(payload.get("model")):
        raise CheckpointError(f"{what} {ckpt} is not a teacher checkpoint: expected {TEACHER_FORMAT}; "
                              f"found {describe_payload(payload)}. {fix}")
    meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else {}
    if meta.get("teacher") and meta["teacher"] != name:
        raise CheckpointError(f"{what} {ckpt} holds a '{meta['teacher']}', but a '{name}' is configured. {fix}")
    if meta.get("num_classes") is not None and int(meta["num_classes"]) != int(num_classes):
        raise CheckpointError(f"{what} {ckpt} was trained for {meta['num_classes']} classes "
                              f"(dataset {meta.get('dataset', '?')}), but this run's data has {num_classes}. {fix}")
    return payload


def load_teacher(cfg: dict, role: str, ckpt: str | Path, num_classes: int):
    """A teacher from a fine-tune checkpoint (its distillation adapter, if any, starts fresh)."""
    payload = read_teacher_checkpoint(cfg, role, ckpt, num_classes)
    name = cfg[role]["name"]
    model = create_model(name, num_classes=num_classes, pretrained=False, small_input=small_input(cfg),
                         distill_out_dim=adapter_dim(cfg, "teacher"))
    what = f"{role} checkpoint {ckpt} ({name}, {num_classes} classes)"
    check_shapes(model, payload["model"], what, ignore=("distill_adapter.",), fix=teacher_fix(name, role))
    missing, unexpected = model.load_state_dict(
        {k: v for k, v in payload["model"].items() if not k.startswith("distill_adapter.")}, strict=False)
    bad = [k for k in missing if not k.startswith("distill_adapter.")] + list(unexpected)
    if bad:
        raise CheckpointError(
            f"{what} does not fit the model: mismatched keys {bad[:5]}. {teacher_fix(name, role)}"
        )
    model.eval()
    return model, payload.get("meta") or {}


def to_device(model, device: torch.device, channels_last: bool):
    model = model.to(device)
    if channels_last:   # NHWC: faster convolutions on GPUs and on CPUs (oneDNN) alike
        model = model.to(memory_format=torch.channels_last)
    return model
