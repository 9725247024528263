"""Building blocks shared by every family: basic, bottleneck and pre-activation blocks.

Each block takes ``residual``: with ``residual=False`` it is the *plain twin* of the residual
block, the same layers with the same parameter names and the addition removed (He et al. 2015,
sec. 4.1 "plain network"). Plain blocks never carry a shortcut module, so under shortcut option A
(parameter-free) a plain net and its residual twin have identical parameter lists.

Shortcut options (He et al. 2015, sec. 3.3 and 4.1):
  A  identity; where the shape changes, subsample by the stride and zero-pad the new channels
     (no parameters)
  B  identity; 1x1 projection + BN only where the shape changes
  C  1x1 projection + BN on every block
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUTS = ("A", "B", "C")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    # bias is redundant before BN
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class PadShortcut(nn.Module):
    """Option A: parameter-free shortcut. Subsample spatially, zero-pad the extra channels."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.extra, self.stride = cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads from the last dim backwards: (W, W, H, H, C_front, C_back)
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, zero_channels={self.extra}"


def make_shortcut(cin: int, cout: int, stride: int, shortcut: str, residual: bool) -> nn.Module | None:
    """The shortcut branch of a residual block, or None for identity (and for every plain block)."""
    if not residual:
        return None
    changes = stride != 1 or cin != cout
    if shortcut == "C" or (shortcut == "B" and changes):
        return nn.Sequential(conv1x1(cin, cout, stride), nn.BatchNorm2d(cout))
    if shortcut == "A" and changes:
        return PadShortcut(cin, cout, stride)
    return None


class Block(nn.Module):
    """A block of a net's stages: what lesions (resnet.lesion) and the backward-signal records find.

    Subclasses set ``residual`` (a shortcut path runs beside the branch), ``cin``, ``cout`` and ``stride``,
    and say what is left of them when deleted (``deleted``): by default, for a residual block its
    shortcut and the ReLU after the addition (exactly the block with its branch set to zero), for a
    plain block the identity (possible only where the shape does not change).
    """

    residual: bool
    cin: int
    cout: int
    stride: int

    def changes_shape(self) -> bool:
        return self.cin != self.cout or self.stride != 1

    def deleted(self) -> nn.Module:
        return Deleted(self.shortcut if self.residual else None, relu=self.residual)


class Deleted(nn.Module):
    """What is left of a deleted block: ``shortcut`` (None: the identity), then a ReLU if ``relu``."""

    def __init__(self, shortcut: nn.Module | None, relu: bool = True):
        super().__init__()
        self.shortcut, self.relu = shortcut, relu

    def forward(self, x):
        x = x if self.shortcut is None else self.shortcut(x)
        return F.relu(x) if self.relu else x


class BasicBlock(Block):
    """Two 3x3 convs (He et al. 2015, Fig. 2 left); post-activation: ReLU after the addition."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"):
        super().__init__()
        self.residual, self.cin, self.cout, self.stride = residual, cin, planes, stride
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(cin, planes, stride, shortcut, residual)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class Bottleneck(Block):
    """1x1 reduce, 3x3, 1x1 expand by 4 (He et al. 2015, Fig. 5 right); stride on the 3x3."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "B"):
        super().__init__()
        cout = planes * self.expansion
        self.residual, self.cin, self.cout, self.stride = residual, cin, cout, stride
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, cout)
        self.bn3 = nn.BatchNorm2d(cout)
        self.shortcut = make_shortcut(cin, cout, stride, shortcut, residual)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class PreActBlock(Block):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings", Fig. 4e): BN-ReLU-conv x2.

    A projection shortcut sees the pre-activated input (as in the paper's code); the
    parameter-free option A sees the raw input, so the identity path stays clean. Deleted, a residual
    block is its shortcut (no ReLU follows the addition here); a projection shortcut would need the
    deleted pre-activation, so only option A blocks and plain ones are deleted as such.
    """

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"):
        super().__init__()
        self.residual, self.cin, self.cout, self.stride = residual, cin, planes, stride
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.shortcut = make_shortcut(cin, planes, stride, shortcut, residual)

    def last_bn(self) -> nn.BatchNorm2d:
        # the branch ends in a conv; the closest BN to zero-init is the one inside the branch
        return self.bn2

    def deleted(self) -> nn.Module:
        if self.residual and self.shortcut is not None and not isinstance(self.shortcut, PadShortcut):
            raise ValueError("a pre-activation block with a projection shortcut cannot be deleted as such "
                             "(its shortcut sees the block's own pre-activation)")
        return Deleted(self.shortcut if self.residual else None, relu=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        if not self.residual:
            return out
        if self.shortcut is None:
            return out + x
        if isinstance(self.shortcut, PadShortcut):
            return out + self.shortcut(x)
        return out + self.shortcut(pre)
