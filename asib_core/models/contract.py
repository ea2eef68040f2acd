"""Checks of the feature-dict contract, usable by tests and by callers that want to fail early."""

from __future__ import annotations

import torch

from .feature_model import FeatureModel


def check_feature_dict(
    model: FeatureModel, out: dict[str, torch.Tensor], *, batch_size: int, num_classes: int
) -> None:
    """Raise ``ValueError`` naming the first broken rule of the contract in ``out``."""
    expected = model.feature_keys()
    if list(out) != expected:
        raise ValueError(f"keys {list(out)} != expected {expected}")
    previous_size = None
    for i, channels in enumerate(model.stage_channels, start=1):
        for key in (f"feat_4d_layer{i}", f"preact_4d_layer{i}"):
            t = out[key]
            if t.dim() != 4 or t.shape[0] != batch_size or t.shape[1] != channels:
                raise ValueError(f"{key}: shape {tuple(t.shape)}, expected [{batch_size}, {channels}, h, w]")
        size = tuple(out[f"feat_4d_layer{i}"].shape[2:])
        if out[f"preact_4d_layer{i}"].shape[2:] != size:
            raise ValueError(f"preact_4d_layer{i} and feat_4d_layer{i} differ in size")
        if previous_size is not None and (size[0] > previous_size[0] or size[1] > previous_size[1]):
            raise ValueError(f"stage {i} map {size} is larger than stage {i - 1} map {previous_size}")
        previous_size = size
    last = out[f"feat_4d_layer{model.num_stages}"]
    if out["feat_4d"] is not last:
        raise ValueError("feat_4d must be the last stage's map")
    if tuple(out["feat_2d"].shape) != (batch_size, model.num_features):
        raise ValueError(f"feat_2d: shape {tuple(out['feat_2d'].shape)}")
    if not torch.allclose(out["feat_2d"], last.mean(dim=(2, 3)), atol=1e-5, rtol=1e-4):
        raise ValueError("feat_2d is not the global average pool of feat_4d")
    if tuple(out["logit"].shape) != (batch_size, num_classes):
        raise ValueError(f"logit: shape {tuple(out['logit'].shape)}, expected ({batch_size}, {num_classes})")
    if model.distill_adapter is not None:
        shape = tuple(out["distill_feat"].shape)
        if shape != (batch_size, model.distill_adapter.out_dim):
            raise ValueError(f"distill_feat: shape {shape}")


def partition_parameters(model: FeatureModel) -> dict[str, list[str]]:
    """Parameter names per part: stem, layer1..N, classifier, distill_adapter.

    Raises ``ValueError`` if a parameter belongs to no part or to several.
    """
    owner: dict[int, str] = {}
    parts: dict[str, list[str]] = {}
    named = [*model.stage_modules(), ("classifier", model.classifier)]
    if model.distill_adapter is not None:
        named.append(("distill_adapter", model.distill_adapter))
    for part, module in named:
        parts[part] = []
        for pname, param in module.named_parameters():
            if id(param) in owner:
                raise ValueError(f"{part}.{pname} is also in {owner[id(param)]}")
            owner[id(param)] = part
            parts[part].append(pname)
    stray = [n for n, p in model.named_parameters() if id(p) not in owner]
    if stray:
        raise ValueError(f"parameters outside stem/stages/classifier/adapter: {stray[:5]}")
    return parts
