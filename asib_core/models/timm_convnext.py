"""timm ConvNeXt (small, large) as stem + 4 stages."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .feature_model import Backbone, Stage
from .pretrained import create_timm_model


def stride_one_patchify(conv: nn.Conv2d) -> nn.Conv2d:
    """Replace ConvNeXt's 4x4 stride-4 patchify conv by the same 4x4 kernel at stride 1.

    TF-style 'same' padding (1 before, 2 after) keeps a 32x32 input at 32x32; the kernel and
    bias are copied unchanged (pretrained or freshly initialised alike).
    """
    from timm.layers import Conv2dSame

    new = Conv2dSame(
        conv.in_channels,
        conv.out_channels,
        kernel_size=conv.kernel_size,
        stride=1,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        new.weight.copy_(conv.weight)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def build_timm_convnext(
    timm_id: str,
    *,
    model_name: str,
    role: str,
    pretrained: bool,
    small_input: bool,
    pretrained_file: str | None,
    **timm_kwargs: Any,
) -> Backbone:
    net, source = create_timm_model(
        timm_id,
        model_name=model_name,
        role=role,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        **timm_kwargs,
    )
    stem = net.stem  # Sequential(conv 4x4/4, LayerNorm2d); the LayerNorm is kept
    if small_input:
        stem[0] = stride_one_patchify(stem[0])
    stages = [Stage(s) for s in net.stages]
    if not isinstance(net.norm_pre, nn.Identity):
        stages[-1] = Stage(net.stages[-1], net.norm_pre)
    channels = [f["num_chs"] for f in net.feature_info]
    # The timm head (global pool -> LayerNorm -> fc) is dropped: feat_2d is the plain pool.
    return Backbone(stem=stem, stages=stages, stage_channels=channels, weights_source=source)
