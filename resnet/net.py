"""One generic network: stem -> stages of blocks -> (optional BN-ReLU) -> global pool -> linear.

The CIFAR family (cifar.py) and the ImageNet-style family (imagenet.py) are both this class with
different stems, widths and blocks; they only differ as data.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from einops.layers.torch import Rearrange
from torch import nn

from .blocks import PreActBlock


class ResNet(nn.Module):
    """Stages of residual (or plain) blocks.

    Args:
        stem: maps the image to ``stem_channels`` feature maps.
        block: block class (BasicBlock, Bottleneck, PreActBlock).
        planes: base width of each stage; the output width is ``planes * block.expansion``.
        blocks: number of blocks per stage.
        strides: stride of the first block of each stage.
        residual: False builds the plain twin (same layers, no addition).
        shortcut: "A", "B" or "C" (see blocks.py).
        zero_init_residual: zero the last BN gamma of every residual branch, so each residual
            block starts as the identity (Goyal et al. 2017). Residual nets only: in a plain net
            it would zero the signal, so plain twins ignore it.
        final: what runs between the last block and the pooling  [default: BN-ReLU after
            pre-activation blocks (their last block ends on a conv), else nothing]
        block_kwargs: passed to every block (a method's hyper-parameters, e.g. a gate bias).
    """

    def __init__(
        self,
        *,
        stem: nn.Sequential,
        stem_channels: int,
        block: type[nn.Module],
        planes: Sequence[int],
        blocks: Sequence[int],
        strides: Sequence[int],
        num_classes: int,
        residual: bool,
        shortcut: str,
        zero_init_residual: bool = False,
        final: nn.Module | None = None,
        block_kwargs: dict | None = None,
    ):
        super().__init__()
        self.stem = stem
        cin = stem_channels
        stages = []
        for p, n, s in zip(planes, blocks, strides):
            layers = []
            for i in range(n):
                layers.append(block(cin, p, s if i == 0 else 1, residual=residual, shortcut=shortcut,
                                    **(block_kwargs or {})))
                cin = p * block.expansion
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        if final is None:
            # pre-activation nets end their last block on a conv: normalise and activate before pooling
            final = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True)) if block is PreActBlock else nn.Identity()
        self.final = final
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), Rearrange("b c 1 1 -> b c"))
        self.fc = nn.Linear(cin, num_classes)
        self._init(zero_init_residual and residual)

    def _init(self, zero_last_bn: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_last_bn:
            for m in self.modules():
                if hasattr(m, "last_bn"):
                    nn.init.zeros_(m.last_bn().weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, num_classes)
        return self.fc(self.pool(self.final(self.stages(self.stem(x)))))
