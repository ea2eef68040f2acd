"""Wide ResNets (Zagoruyko & Komodakis) of the KD benchmarks: wrn_16_2, wrn_40_2, ...

Layout for WRN-d-k: 3x3 stem conv (16 ch, no BN), three stages of ``n = (d - 4) / 6``
pre-activation blocks with widths 16k, 32k, 64k and strides 1/2/2, then a final BN + ReLU,
which this project places at the end of stage 3.

Pre-activation design: a block computes ``BN-ReLU-conv3x3-BN-ReLU-conv3x3`` and adds the
shortcut; it ends with the sum, not with an activation. Stage 1 and 2 outputs are therefore
raw residual sums (their ``preact`` keys alias them), and only stage 3 has a distinct
pre-activation map (the final BN output, before the final ReLU).
"""

from __future__ import annotations

import torch
from torch import nn

from .cifar_resnet import conv3x3, init_cifar_weights
from .feature_model import Backbone, Stage


class PreActBlock(nn.Module):
    """Wide-ResNet basic block; a width/stride change uses a 1x1 conv on the activated input."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = self.act1(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        residual = x if self.shortcut is None else self.shortcut(activated)
        return out + residual


def build_wide_resnet(depth: int, widen: int, dropout: float = 0.0) -> Backbone:
    if (depth - 4) % 6 != 0:
        raise ValueError(f"Wide ResNet depth must be 6n+4, got {depth}")
    blocks_per_stage = (depth - 4) // 6
    widths = [16 * widen, 32 * widen, 64 * widen]
    stem = nn.Sequential()
    stem.add_module("conv1", conv3x3(3, 16))
    stages = []
    in_ch = 16
    for index, out_ch in enumerate(widths):
        stride = 1 if index == 0 else 2
        blocks: list[nn.Module] = []
        for b in range(blocks_per_stage):
            blocks.append(PreActBlock(in_ch, out_ch, stride if b == 0 else 1, dropout))
            in_ch = out_ch
        if index == len(widths) - 1:
            stages.append(Stage(*blocks, nn.BatchNorm2d(out_ch), final_act=nn.ReLU()))
        else:
            stages.append(Stage(*blocks))
    for part in (stem, *stages):
        init_cifar_weights(part)
    return Backbone(stem=stem, stages=stages, stage_channels=widths)
