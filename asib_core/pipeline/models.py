"""Build the student and the teachers of a run from the effective config."""
from __future__ import annotations

from pathlib import Path

import torch

from asib_core.config.effective import ASIB_FAMILY
from asib_core.errors import MissingArtifactError
from asib_core.models import create_model
from asib_core.engine.state import load_state


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


def load_teacher(cfg: dict, role: str, ckpt: str | Path, num_classes: int):
    """A teacher from a fine-tune checkpoint (its distillation adapter, if any, starts fresh)."""
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise MissingArtifactError(f"teacher checkpoint not found: {ckpt}")
    payload = load_state(ckpt)
    meta = payload.get("meta", {})
    name = cfg[role]["name"]
    if meta.get("teacher") and meta["teacher"] != name:
        raise MissingArtifactError(
            f"{role} is configured as '{name}' but the checkpoint {ckpt} holds a '{meta['teacher']}'. "
            f"Point {role}_ckpt at a {name} checkpoint or change {role}."
        )
    model = create_model(name, num_classes=num_classes, pretrained=False, small_input=small_input(cfg),
                         distill_out_dim=adapter_dim(cfg, "teacher"))
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    bad = [k for k in missing if not k.startswith("distill_adapter.")] + list(unexpected)
    if bad:
        raise MissingArtifactError(
            f"teacher checkpoint {ckpt} does not fit a {name} with {num_classes} classes "
            f"(mismatched keys: {bad[:5]}). Fine-tune the teacher on this dataset first."
        )
    model.eval()
    return model, meta


def to_device(model, device: torch.device, channels_last: bool):
    model = model.to(device)
    if channels_last and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
