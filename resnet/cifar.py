"""The CIFAR family of He et al. 2015, sec. 4.2: depth 6n+2.

A 3x3 conv with 16 filters, then three stages of n blocks (2n layers each) on 32/16/8 maps with
16/32/64 filters, downsampling by a stride-2 first conv, global average pooling and one linear
layer: 6n+2 weighted layers. ``preact=True`` gives the pre-activation variant of He et al. 2016.
"""
from __future__ import annotations

from torch import nn

from .blocks import BasicBlock, PreActBlock, conv3x3
from .net import ResNet

CIFAR_WIDTHS = (16, 32, 64)


def scaled(channels: int, width: float) -> int:
    """Channels after the width multiplier, at least 1."""
    return max(1, round(channels * width))


def cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    residual: bool = True,
    preact: bool = False,
    shortcut: str = "A",
    width: float = 1.0,
    in_channels: int = 3,
    zero_init_residual: bool = False,
) -> ResNet:
    n = (depth - 2) // 6
    planes = [scaled(c, width) for c in CIFAR_WIDTHS]
    stem = [conv3x3(in_channels, planes[0])]
    if not preact:  # a pre-activation net's first block normalises the stem output itself
        stem += [nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True)]
    return ResNet(
        stem=nn.Sequential(*stem),
        stem_channels=planes[0],
        block=PreActBlock if preact else BasicBlock,
        planes=planes,
        blocks=(n, n, n),
        strides=(1, 2, 2),
        num_classes=num_classes,
        residual=residual,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
    )
