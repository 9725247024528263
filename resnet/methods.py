"""Fixes of the degradation problem, on He et al.'s CIFAR topology (resnet.cifar: a 3x3 stem, three
stages of n blocks on 32/16/8 maps with 16/32/64 filters x width, option A where a shortcut changes
shape, global average pooling, one linear layer): each a family at every depth 6n+2, registered
under its kind (``highway20``, ``fixup56``, ...). What differs from resnet{d} / plain{d}:

highway   Srivastava, Greff, Schmidhuber 2015, "Training Very Deep Networks": y = H(x) T(x) +
          x (1 - T(x)); H the basic block's branch with its ReLU, T = sigmoid(conv3x3(x) + b) per
          channel and position, b initialised to ``gate_bias`` = -1 (the paper's sec. 2.2 suggests a
          negative value, "e.g. -1, -3"); x the option-A shortcut. BN kept in H. Deleted: the carry
          path (T = 0), x.
fixup     Zhang, Dauphin, Ma 2019, "Fixup Initialization" (code: hongyi-zhang/Fixup,
          cifar/models/fixup_resnet_cifar.py, followed line by line): no BN; scalar biases before
          each conv and activation, a scalar multiplier per branch; each branch's last conv and the
          classifier (weight and bias) zero; the other branch conv He-initialised (fan_out) and
          scaled by L^(-1/(2m-2)) = L^(-1/2) (L blocks, m = 2 layers per branch); scalars (every
          parameter named ``bias`` or ``scale``) train at lr / 10, as their cifar_train.py does.
          Deleted: relu(shortcut), the block with its branch zero.
skipinit  De and Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity
          Function in Deep Networks": no BN (convs get biases instead); a learnable scalar
          alpha = 0 at the end of each branch: y = relu(x + alpha F(x)), He's post-activation
          block. Deleted: relu(shortcut).
rezero    Bachlechner et al. 2020, "ReZero is All You Need" (their CIFAR ResNet in
          tbachlechner/ReZero-examples): BN kept; y = x + alpha relu(F(x)), alpha = 0, no ReLU
          after the addition (their code puts the skip after the nonlinearity). Deleted: x.
dirac     Zagoruyko and Komodakis 2017, "DiracNets" (code: szagoruyko/diracnets): no shortcut;
          each 3x3 conv of the blocks is diag(a) I + diag(b) W / ||W|| (I the Dirac delta, W
          normalised per output filter), a = 1, b = 0.1 at init, as their code; BN kept; a stage's
          first conv keeps He's stride 2 (the delta then subsamples and zero-pads, as option A
          does), where their code max-pools. Deleted (a shape-keeping block): the identity.

Where a method needs no more than its code (another lr for some parameters), the family says so
(``lr_scales``); no recipe is tuned to make a method look good. TAT (resnet.tat) lives apart: it
needs DeepMind's dks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, Deleted, conv3x3, make_shortcut
from .cifar import CIFAR_WIDTHS, scaled
from .net import ResNet
from .registry import Family, register


class BranchBlock(Block):
    """What the methods' blocks keep of He et al.'s basic block: two 3x3 convs (the first strided; ``conv`` makes
    them), a BN after each where the method keeps BN, and option A's parameter-free shortcut where the shape
    changes (no shortcut in a block without a shortcut path: ``residual``, the family's, passed by the net)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool, shortcut: str = "A",
                 conv=conv3x3, bn: bool = True):
        super().__init__()
        if shortcut != "A":  # resnet.build refuses others first; a block built by hand says so too
            raise ValueError(f"{type(self).__name__} is built with shortcut option A only, got {shortcut!r}")
        self.residual, self.cin, self.cout, self.stride = residual, cin, planes, stride
        self.conv1 = conv(cin, planes, stride)
        if bn:
            self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes)
        if bn:
            self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = make_shortcut(cin, planes, stride, shortcut, residual)

    def carry(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path: x, subsampled and zero-padded where the shape changes."""
        return x if self.shortcut is None else self.shortcut(x)


def cifar_net(depth: int, block: type[Block], *, num_classes: int, width: float, in_channels: int, residual: bool,
              stem: nn.Module | None = None, final: nn.Module | None = None, bn_stem: bool = True,
              block_kwargs: dict | None = None) -> ResNet:
    """He et al.'s CIFAR skeleton around ``block`` (resnet.cifar), for the methods' blocks."""
    n = (depth - 2) // 6
    planes = [scaled(c, width) for c in CIFAR_WIDTHS]
    if stem is None:
        layers = [conv3x3(in_channels, planes[0])] if bn_stem else [nn.Conv2d(in_channels, planes[0], 3, padding=1)]
        stem = nn.Sequential(*layers, *([nn.BatchNorm2d(planes[0])] if bn_stem else []), nn.ReLU(inplace=True))
    return ResNet(stem=stem, stem_channels=planes[0], block=block, planes=planes, blocks=(n, n, n), strides=(1, 2, 2),
                  num_classes=num_classes, residual=residual, shortcut="A", final=final, block_kwargs=block_kwargs)


# -- highway -------------------------------------------------------------------------------------------

class HighwayBlock(BranchBlock):
    """y = H(x) T(x) + x (1 - T(x)), see the module docstring."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A",
                 gate_bias: float = -1.0):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut)
        self.gate = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=True)
        self.gate_bias = gate_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        t = torch.sigmoid(self.gate(x))
        return h * t + self.carry(x) * (1 - t)

    def deleted(self) -> nn.Module:
        return Deleted(self.shortcut, relu=False)  # T = 0: what the carry gate lets through


def highway_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, shortcut: str = "A",
                gate_bias: float = -1.0) -> ResNet:
    net = cifar_net(depth, HighwayBlock, num_classes=num_classes, width=width, in_channels=in_channels, residual=True,
                    block_kwargs=dict(gate_bias=gate_bias))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, HighwayBlock):
                m.gate.bias.fill_(gate_bias)
    return net


# -- Fixup ---------------------------------------------------------------------------------------------

class Scalar(nn.Module):
    """x + b, one learnable scalar (Fixup's biases; ``bias`` in its name, as their optimizer groups want)."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x + self.bias


class FixupBlock(BranchBlock):
    """hongyi-zhang/Fixup's FixupBasicBlock, with option A's zero channels at the end (their torch.cat)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut, bn=False)
        self.bias1a = nn.Parameter(torch.zeros(1))
        self.bias1b = nn.Parameter(torch.zeros(1))
        self.bias2a = nn.Parameter(torch.zeros(1))
        self.scale = nn.Parameter(torch.ones(1))
        self.bias2b = nn.Parameter(torch.zeros(1))

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        # their code: the identity is x itself, or the subsampled (x + bias1a) where the shape changes
        return x if self.shortcut is None else self.shortcut(x + self.bias1a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x + self.bias1a) + self.bias1b)
        out = self.conv2(out + self.bias2a) * self.scale + self.bias2b
        return F.relu(out + self.identity(x))

    def deleted(self) -> nn.Module:
        return _FixupDeleted(self)


class _FixupDeleted(nn.Module):
    """A Fixup block with its branch zero: relu(identity)."""

    def __init__(self, block: FixupBlock):
        super().__init__()
        self.block = block

    def forward(self, x):
        return F.relu(self.block.identity(x))


class _FixupStem(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = conv3x3(cin, cout)
        self.bias1 = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.relu(self.conv(x) + self.bias1)


def fixup_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
              shortcut: str = "A") -> ResNet:
    planes0 = scaled(CIFAR_WIDTHS[0], width)
    head = Scalar()  # their fc(x + bias2): a scalar before the linear layer (pooling is an average)
    net = cifar_net(depth, FixupBlock, num_classes=num_classes, width=width, in_channels=in_channels, residual=True,
                    stem=_FixupStem(in_channels, planes0), final=head)
    blocks = [m for m in net.modules() if isinstance(m, FixupBlock)]
    with torch.no_grad():
        for b in blocks:
            w = b.conv1.weight  # He (fan_out) normal, scaled by L^(-1/(2m - 2)) with m = 2
            nn.init.normal_(w, 0.0, math.sqrt(2 / (w.shape[0] * w[0, 0].numel())) * len(blocks) ** -0.5)
            nn.init.zeros_(b.conv2.weight)
        nn.init.zeros_(net.fc.weight)
        nn.init.zeros_(net.fc.bias)
    return net


# -- SkipInit and ReZero ---------------------------------------------------------------------------------

def conv3x3_bias(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    """A 3x3 conv with a bias: the branch convs of the methods without BN (SkipInit's, TAT's)."""
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


class SkipInitBlock(BranchBlock):
    """relu(x + alpha F(x)), F = conv-ReLU-conv with biases (no BN), alpha = 0."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut, conv=conv3x3_bias, bn=False)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = self.conv2(F.relu(self.conv1(x)))
        return F.relu(self.carry(x) + self.alpha * out)


class ReZeroBlock(BranchBlock):
    """x + alpha relu(BN(conv(relu(BN(conv(x)))))), alpha = 0: their CIFAR block (no ReLU after the addition)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = True, shortcut: str = "A"):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut)
        self.alpha = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.carry(x) + self.alpha * out

    def deleted(self) -> nn.Module:
        return Deleted(self.shortcut, relu=False)


def _zero_biases(net: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def skipinit_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
                 shortcut: str = "A") -> ResNet:
    return _zero_biases(cifar_net(depth, SkipInitBlock, num_classes=num_classes, width=width, in_channels=in_channels,
                                  residual=True, bn_stem=False))


def rezero_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
               shortcut: str = "A") -> ResNet:
    return cifar_net(depth, ReZeroBlock, num_classes=num_classes, width=width, in_channels=in_channels, residual=True)


# -- DiracNet --------------------------------------------------------------------------------------------

class DiracConv(nn.Conv2d):
    """A 3x3 conv whose weight is diag(a) I + diag(b) W / ||W||_filter (szagoruyko/diracnets' DiracConv2d)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.a = nn.Parameter(torch.ones(cout))
        self.b = nn.Parameter(torch.full((cout,), 0.1))
        self.register_buffer("delta", nn.init.dirac_(torch.empty_like(self.weight)), persistent=False)

    def effective_weight(self) -> torch.Tensor:
        w = F.normalize(self.weight.flatten(1)).view_as(self.weight)
        return self.a[:, None, None, None] * self.delta + self.b[:, None, None, None] * w

    def forward(self, x):
        return F.conv2d(x, self.effective_weight(), None, self.stride, self.padding)


class DiracBlock(BranchBlock):
    """A plain block (conv-BN-ReLU twice, no shortcut) of Dirac-parametrised convs."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = False, shortcut: str = "A"):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut, conv=DiracConv)

    def forward(self, x):
        return F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


def dirac_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3,
              shortcut: str = "A") -> ResNet:
    return cifar_net(depth, DiracBlock, num_classes=num_classes, width=width, in_channels=in_channels, residual=False)


# -- registered ------------------------------------------------------------------------------------------

register(Family("highway", highway_net, residual=True, normalization="bn", params=dict(gate_bias=-1.0),
                paper="Srivastava, Greff, Schmidhuber 2015, Training Very Deep Networks"))
# their cifar_train.py: inputs standardized per channel, mixup with alpha 1 (its default)
register(Family("fixup", fixup_net, residual=True, normalization="none", lr_scales=((r"bias|scale", 0.1),),
                paper="Zhang, Dauphin, Ma 2019, Fixup Initialization (hongyi-zhang/Fixup)",
                paper_recipe=dict(normalize="standardize", mixup=1.0)))
register(Family("skipinit", skipinit_net, residual=True, normalization="none",
                paper="De and Smith 2020, Batch Normalization Biases Residual Blocks Towards the Identity Function"))
register(Family("rezero", rezero_net, residual=True, normalization="bn",
                paper="Bachlechner et al. 2020, ReZero is All You Need (tbachlechner/ReZero-examples)"))
# their v2 train.py: weight decay on parameters of 2 or more dimensions only (not on a, b, BN's affine)
register(Family("dirac", dirac_net, residual=False, normalization="bn",
                paper="Zagoruyko and Komodakis 2017, DiracNets (szagoruyko/diracnets)",
                paper_recipe=dict(decay_1d=False)))
