"""torchvision ShuffleNetV2 x1.0 (timm has no ShuffleNet) as stem + 3 stages.

stem = conv1 (conv-BN-ReLU) + maxpool; layer1 = stage2; layer2 = stage3;
layer3 = stage4 + conv5 (1x1 conv-BN, its ReLU is the stage's final act).
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .feature_model import Backbone, Stage, detached_activation
from .pretrained import load_torchvision_weights

SHUFFLENET_ID = "shufflenet_v2_x1_0"


def build_tv_shufflenet_v2(
    *,
    model_name: str,
    role: str,
    pretrained: bool,
    small_input: bool,
    pretrained_file: str | None,
) -> Backbone:
    from torchvision.models import ShuffleNet_V2_X1_0_Weights, shufflenet_v2_x1_0

    net = shufflenet_v2_x1_0(weights=None)
    source = None
    if pretrained:
        url = ShuffleNet_V2_X1_0_Weights.IMAGENET1K_V1.url
        source = load_torchvision_weights(
            net,
            model_name=model_name,
            role=role,
            source_id=SHUFFLENET_ID,
            hub_filename=url.rsplit("/", 1)[-1],
            pretrained_file=pretrained_file,
        )
    maxpool: nn.Module = net.maxpool
    if small_input:
        first_conv = net.conv1[0]
        first_conv.stride = (1, 1)
        first_conv.padding = (1, 1)
        maxpool = nn.Identity()
    stem = nn.Sequential(OrderedDict(conv1=net.conv1, maxpool=maxpool))
    final_act = detached_activation(net.conv5, "2")
    stages = [
        Stage(*net.stage2),
        Stage(*net.stage3),
        Stage(*net.stage4, net.conv5, final_act=final_act),
    ]
    channels = [
        net.stage2[-1].branch2[-2].num_features * 2,
        net.stage3[-1].branch2[-2].num_features * 2,
        net.conv5[1].num_features,
    ]
    return Backbone(stem=stem, stages=stages, stage_channels=channels, weights_source=source)
