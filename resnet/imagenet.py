"""The ImageNet-style family (He et al. 2015, Table 1): ResNet-18/34/50/101/152, as in the seed.

Stages of 64/128/256/512 planes. The default stem is the seed's 3x3 conv for 32x32 inputs
(no max-pool; the usual CIFAR adaptation); ``stem="imagenet"`` gives the paper's 7x7/2 conv +
3x3/2 max-pool. Shortcut option B (projection only where the shape changes) is the default, as in
the seed and torchvision.
"""
from __future__ import annotations

from torch import nn

from .blocks import BasicBlock, Bottleneck, conv3x3
from .cifar import scaled
from .net import ResNet

# depth -> (block, blocks per stage), He et al. 2015 Table 1
LAYOUTS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
STEMS = ("cifar", "imagenet")


def imagenet_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    residual: bool = True,
    shortcut: str = "B",
    width: float = 1.0,
    in_channels: int = 3,
    stem: str = "cifar",
    zero_init_residual: bool = False,
) -> ResNet:
    block, blocks = LAYOUTS[depth]
    planes = [scaled(c, width) for c in (64, 128, 256, 512)]
    if stem == "cifar":
        layers = [conv3x3(in_channels, planes[0]), nn.BatchNorm2d(planes[0]), nn.ReLU(inplace=True)]
    else:
        layers = [
            nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(planes[0]),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        ]
    return ResNet(
        stem=nn.Sequential(*layers),
        stem_channels=planes[0],
        block=block,
        planes=planes,
        blocks=blocks,
        strides=(1, 2, 2, 2),
        num_classes=num_classes,
        residual=residual,
        shortcut=shortcut,
        zero_init_residual=zero_init_residual,
    )
