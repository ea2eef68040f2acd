"""Pretrained-weight resolution for every model of the registry.

Order in which weights are looked for when ``pretrained=True``:

1. ``pretrained_file`` given by the caller (must exist);
2. ``$ASIB_PRETRAINED_DIR/<timm id>.{safetensors,pth,bin}``, then the same with the bare
   architecture name (``resnet152.safetensors``);
3. the library's own mechanism: timm's Hugging Face hub / URL download (which uses its local
   cache first), or, for torchvision models, the torch hub cache only (never a download).

Whatever fails, :class:`PretrainedWeightsUnavailable` is raised. Random initialisation is never
used as a silent fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

PRETRAINED_DIR_ENV = "ASIB_PRETRAINED_DIR"
WEIGHT_FILE_SUFFIXES = (".safetensors", ".pth", ".bin")


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were requested but could not be obtained."""


def describe_missing_weights(
    *, model_name: str, role: str, source_id: str, tried: list[str], reason: str
) -> str:
    """One-paragraph message that says what was tried and how to supply the weights."""
    role_key = role if role in ("teacher", "student") else "<teacher|student>"
    tried_text = "; ".join(tried) if tried else "nothing"
    bare = source_id.split(".")[0]
    other_names = f"`{bare}.safetensors`, " if bare != source_id else ""
    return (
        f"Pretrained weights for model '{model_name}' ({source_id}) are not available: "
        f"{reason.strip().rstrip('.')}. Tried: {tried_text}. Supply a local weight file in the "
        f"format of {source_id} (a complete state dict as saved by timm / torchvision, "
        f".safetensors or .pth) with `model.{role_key}.pretrained_file=/path/to/file` "
        f"(create_model(..., pretrained_file=...)), or place it at "
        f"`${PRETRAINED_DIR_ENV}/{source_id}.safetensors` (or {other_names}`.pth`, `.bin`), "
        f"or set `pretrained=false` to train from a random initialisation on purpose. "
        f"On an offline machine set HF_HUB_OFFLINE=1 so that a missing file fails at once."
    )


def candidate_files(source_id: str, extra_names: tuple[str, ...] = ()) -> list[Path]:
    """Files looked up in ``$ASIB_PRETRAINED_DIR`` for ``source_id`` (empty when unset)."""
    root = os.environ.get(PRETRAINED_DIR_ENV, "").strip()
    if not root:
        return []
    names = [source_id]
    bare = source_id.split(".")[0]
    if bare != source_id:
        names.append(bare)
    names.extend(extra_names)
    return [Path(root) / f"{name}{suffix}" for name in names for suffix in WEIGHT_FILE_SUFFIXES]


def find_local_file(
    source_id: str, pretrained_file: str | os.PathLike | None, extra_names: tuple[str, ...] = ()
) -> tuple[Path | None, list[str]]:
    """Return ``(path or None, paths tried)``; an explicit file that is missing is an error."""
    tried: list[str] = []
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        tried.append(str(path))
        if not path.is_file():
            return None, tried
        return path, tried
    if not os.environ.get(PRETRAINED_DIR_ENV, "").strip():
        tried.append(f"${PRETRAINED_DIR_ENV} (not set)")
    for path in candidate_files(source_id, extra_names):
        tried.append(str(path))
        if path.is_file():
            return path, tried
    return None, tried


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a plain state dict (safetensors or torch file, optionally nested in 'state_dict')."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def create_timm_model(
    source_id: str,
    *,
    model_name: str,
    role: str,
    pretrained: bool,
    pretrained_file: str | os.PathLike | None = None,
    convert_state_dict: Callable[[dict[str, torch.Tensor], nn.Module], dict] | None = None,
    fallback_file: Callable[[], Path | None] | None = None,
    **timm_kwargs: Any,
) -> tuple[nn.Module, str | None]:
    """Create a timm model, loading pretrained weights strictly when asked.

    The model keeps timm's default number of classes so that timm loads the weight file
    strictly (every key must match); callers discard the head afterwards.

    ``convert_state_dict`` (optional) turns a foreign state dict read from a local file into
    timm's layout; it is then passed to timm as a ``state_dict`` overlay instead of the file.
    ``fallback_file`` (optional) supplies a last local file before timm's own download.

    Returns ``(model, description of the weight source or None)``.
    """
    import timm

    if not pretrained:
        return timm.create_model(source_id, pretrained=False, **timm_kwargs), None

    path, tried = find_local_file(source_id, pretrained_file)
    if path is None and pretrained_file is None and fallback_file is not None:
        path = fallback_file()
        if path is not None:
            tried.append(str(path))
    if path is None and pretrained_file is not None:
        raise PretrainedWeightsUnavailable(
            describe_missing_weights(
                model_name=model_name,
                role=role,
                source_id=source_id,
                tried=tried,
                reason=f"the file given as pretrained_file does not exist ({tried[0]})",
            )
        )

    if path is not None:
        if convert_state_dict is not None:
            try:
                reference = timm.create_model(source_id, pretrained=False, **timm_kwargs)
                state = convert_state_dict(read_state_dict(path), reference)
            except Exception as exc:  # noqa: BLE001 - reported with context below
                raise PretrainedWeightsUnavailable(
                    describe_missing_weights(
                        model_name=model_name,
                        role=role,
                        source_id=source_id,
                        tried=tried,
                        reason=f"could not read or convert {path}: {exc}",
                    )
                ) from exc
            overlay: dict[str, Any] = {"state_dict": state}
        else:
            overlay = {"file": str(path)}
        source = f"file:{path}"
    else:
        overlay = {}
        source = f"timm:{source_id}"
        tried.append(f"timm download/cache for {source_id}")

    try:
        model = timm.create_model(
            source_id, pretrained=True, pretrained_cfg_overlay=overlay, **timm_kwargs
        )
    except Exception as exc:  # noqa: BLE001 - any failure means no weights: say so clearly
        reason = f"{type(exc).__name__}: {exc}".strip()
        if path is not None:
            reason = f"loading {path} failed ({reason})"
        raise PretrainedWeightsUnavailable(
            describe_missing_weights(
                model_name=model_name, role=role, source_id=source_id, tried=tried, reason=reason
            )
        ) from exc
    return model, source


def load_torchvision_weights(
    model: nn.Module,
    *,
    model_name: str,
    role: str,
    source_id: str,
    hub_filename: str,
    pretrained_file: str | os.PathLike | None,
) -> str:
    """Load torchvision ImageNet weights from a local file or the torch hub cache (no download).

    Returns a description of the weight source.
    """
    path, tried = find_local_file(source_id, pretrained_file, extra_names=(Path(hub_filename).stem,))
    if path is None and pretrained_file is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / hub_filename
        tried.append(str(cached))
        if cached.is_file():
            path = cached
    if path is None:
        raise PretrainedWeightsUnavailable(
            describe_missing_weights(
                model_name=model_name,
                role=role,
                source_id=source_id,
                tried=tried,
                reason="no local weight file was found (torchvision weights are never downloaded "
                "here)",
            )
        )
    try:
        model.load_state_dict(read_state_dict(path), strict=True)
    except Exception as exc:  # noqa: BLE001
        raise PretrainedWeightsUnavailable(
            describe_missing_weights(
                model_name=model_name,
                role=role,
                source_id=source_id,
                tried=tried,
                reason=f"loading {path} failed ({type(exc).__name__}: {exc})",
            )
        ) from exc
    return f"file:{path}"
