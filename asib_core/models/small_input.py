"""Stem surgery helpers that adapt ImageNet stems to 32x32 inputs."""

from __future__ import annotations

import torch
from torch import nn


def centre_crop_conv3x3(conv: nn.Conv2d, *, keep_weights: bool) -> nn.Conv2d:
    """A 3x3 stride-1 padding-1 conv replacing a larger stem conv (e.g. ResNet's 7x7/2).

    With ``keep_weights`` the new kernel is the centre 3x3 crop of the old (pretrained) one;
    otherwise it gets a fresh Kaiming-normal (fan-out, ReLU) init, as timm's ResNet uses.
    """
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        kernel_size=3,
        stride=1,
        padding=1,
        bias=conv.bias is not None,
    )
    if keep_weights:
        kh, kw = conv.kernel_size
        if kh < 3 or kw < 3:
            raise ValueError(f"cannot crop a 3x3 kernel out of {conv.kernel_size}")
        top, left = (kh - 3) // 2, (kw - 3) // 2
        with torch.no_grad():
            new.weight.copy_(conv.weight[:, :, top : top + 3, left : left + 3])
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def set_stride_one(conv: nn.Conv2d) -> nn.Conv2d:
    """Make a stem conv stride 1 in place, keeping its weights and 'same'-size output.

    timm's TF-style ``Conv2dSame`` computes its padding from the stride at run time, so only
    the stride changes; a plain conv gets symmetric padding ``k // 2`` (odd kernels).
    """
    from timm.layers import Conv2dSame

    conv.stride = (1, 1)
    if not isinstance(conv, Conv2dSame):
        kh, kw = conv.kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"set_stride_one needs an odd kernel, got {conv.kernel_size}")
        conv.padding = (kh // 2, kw // 2)
    return conv
