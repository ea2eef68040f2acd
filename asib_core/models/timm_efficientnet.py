"""timm EfficientNet-class models (EfficientNet-B0/-L2/-Lite0, MobileNetV2) as stem + 5 stages.

timm stores these networks as ``conv_stem, bn1, blocks[0..6], conv_head, bn2``. The seven
block groups are regrouped by output resolution, as timm's own ``feature_info`` does (one
stage per stride 2, 4, 8, 16, 32 of the ImageNet stem):

* layer1 = blocks[0], layer2 = blocks[1], layer3 = blocks[2],
* layer4 = blocks[3] + blocks[4],
* layer5 = blocks[5] + blocks[6] + conv_head + bn2 (its activation is the stage's final act).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .feature_model import Backbone, Stage, detached_activation
from .pretrained import create_timm_model
from .small_input import set_stride_one


def _stage_ends(net: nn.Module) -> list[int]:
    """Indices of the last block group of each resolution stage (from timm's feature_info)."""
    ends = []
    for feature in net.feature_info:
        prefix, _, index = feature["module"].partition(".")
        if prefix == "blocks":
            ends.append(int(index))
    if not ends or ends[-1] != len(net.blocks) - 1:
        raise ValueError(f"unexpected feature_info {net.feature_info}")
    return ends


def build_timm_efficientnet(
    timm_id: str,
    *,
    model_name: str,
    role: str,
    pretrained: bool,
    small_input: bool,
    pretrained_file: str | None,
    convert_state_dict=None,
    fallback_file=None,
    **timm_kwargs: Any,
) -> Backbone:
    net, source = create_timm_model(
        timm_id,
        model_name=model_name,
        role=role,
        pretrained=pretrained,
        pretrained_file=pretrained_file,
        convert_state_dict=convert_state_dict,
        fallback_file=fallback_file,
        **timm_kwargs,
    )
    if small_input:
        set_stride_one(net.conv_stem)
    stem = nn.Sequential()
    stem.add_module("conv_stem", net.conv_stem)
    stem.add_module("bn1", net.bn1)

    groups = list(net.blocks)
    ends = _stage_ends(net)
    stages: list[Stage] = []
    channels = [f["num_chs"] for f in net.feature_info if f["module"].startswith("blocks.")]
    start = 0
    for stage_index, end in enumerate(ends):
        members: list[nn.Module] = groups[start : end + 1]
        start = end + 1
        if stage_index < len(ends) - 1:
            stages.append(Stage(*members))
            continue
        final_act = None
        if not isinstance(net.conv_head, nn.Identity):
            final_act = detached_activation(net.bn2, "act")
            members = [*members, net.conv_head, net.bn2]
            channels[-1] = net.num_features
        stages.append(Stage(*members, final_act=final_act))
    return Backbone(stem=stem, stages=stages, stage_channels=channels, weights_source=source)
