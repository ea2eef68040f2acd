"""timm ResNets (ResNet-50/101/152) as stem + 4 stages."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from .feature_model import Backbone, Stage, detached_activation
from .pretrained import create_timm_model
from .small_input import centre_crop_conv3x3


def _final_act_name(block: nn.Module) -> str:
    """Name of the activation applied after the residual sum (Bottleneck: act3, Basic: act2)."""
    for name in ("act3", "act2"):
        if hasattr(block, name):
            return name
    raise TypeError(f"unsupported ResNet block {type(block).__name__}")


def resnet_stage(layer: nn.Sequential) -> Stage:
    """Blocks of one ResNet layer; the last block's final ReLU becomes the stage's final act."""
    blocks = list(layer)
    act = detached_activation(blocks[-1], _final_act_name(blocks[-1]))
    return Stage(*blocks, final_act=act)


def build_timm_resnet(
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
    if not isinstance(net.conv1, nn.Conv2d):
        raise TypeError(f"{timm_id}: expected a single-conv stem, got {type(net.conv1).__name__}")
    conv1, maxpool = net.conv1, net.maxpool
    if small_input:
        conv1 = centre_crop_conv3x3(conv1, keep_weights=pretrained)
        maxpool = nn.Identity()
    stem = nn.Sequential(
        OrderedDict(conv1=conv1, bn1=net.bn1, act1=net.act1, maxpool=maxpool)
    )
    stages = [resnet_stage(getattr(net, f"layer{i}")) for i in range(1, 5)]
    channels = [f["num_chs"] for f in net.feature_info if f["module"].startswith("layer")]
    return Backbone(stem=stem, stages=stages, stage_channels=channels, weights_source=source)

