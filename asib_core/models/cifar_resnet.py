"""CIFAR-style ResNets of the KD benchmarks (resnet8 ... resnet110, resnet8x4, resnet32x4).

Layout: 3x3 stride-1 stem conv + BN + ReLU, then three stages of BasicBlocks with strides
1/2/2 and ``n = (depth - 2) / 6`` blocks each. A block whose stride or width changes uses a
1x1 conv + BN projection shortcut. Widths are ``(stem, w1, w2, w3)``: 16-16-32-64 for the
plain nets, 32-64-128-256 for the "x4" nets. A 32x32 input gives 32, 16 and 8 pixel maps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .feature_model import Backbone, Stage, detached_activation


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual sum, followed by ReLU (``act2``)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch),
            )
        else:
            self.shortcut = nn.Identity()
        self.act2: nn.Module = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


def init_cifar_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit/zero BatchNorm (the benchmark nets' init)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def build_cifar_resnet(depth: int, widths: tuple[int, int, int, int]) -> Backbone:
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    blocks_per_stage = (depth - 2) // 6
    stem_width, *stage_widths = widths
    stem = nn.Sequential(
        OrderedDict(
            conv1=conv3x3(3, stem_width),
            bn1=nn.BatchNorm2d(stem_width),
            act1=nn.ReLU(inplace=True),
        )
    )
    stages = []
    in_ch = stem_width
    for index, out_ch in enumerate(stage_widths):
        stride = 1 if index == 0 else 2
        blocks = []
        for b in range(blocks_per_stage):
            blocks.append(BasicBlock(in_ch, out_ch, stride if b == 0 else 1))
            in_ch = out_ch
        final_act = detached_activation(blocks[-1], "act2")
        stages.append(Stage(*blocks, final_act=final_act))
    for part in (stem, *stages):
        init_cifar_weights(part)
    return Backbone(stem=stem, stages=stages, stage_channels=list(stage_widths))
