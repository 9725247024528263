"""Lesions (Veit, Wilber and Belongie 2016): a net with some of its blocks deleted, at test time.

A residual block deleted becomes its shortcut followed by the block's final ReLU, which is exactly
the block with its residual branch set to zero; a plain block can be deleted only where its input
and output shapes match, and then becomes the identity.
"""
from __future__ import annotations

import copy

import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, Bottleneck


def blocks(net: nn.Module) -> list[nn.Module]:
    """The net's blocks in order (basic and bottleneck blocks of resnet.build nets)."""
    return [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]


def changes_shape(block: nn.Module) -> bool:
    """Whether the block's output has another shape than its input (a stage's first, downsampling block;
    in bottleneck nets also the first block of the first stage, which widens the channels)."""
    first = block.conv1
    return first.in_channels != block.last_bn().num_features or first.stride != (1, 1)


def deletable(block: nn.Module) -> bool:
    """Whether deleting the block leaves a working net (see the module docstring)."""
    return block.residual or not changes_shape(block)


class Deleted(nn.Module):
    """What is left of a deleted block: relu(shortcut(x)) for a residual block, x for a plain one."""

    def __init__(self, residual: bool, shortcut: nn.Module | None):
        super().__init__()
        self.residual, self.shortcut = residual, shortcut

    def forward(self, x):
        if not self.residual:
            return x
        return F.relu(x if self.shortcut is None else self.shortcut(x))


def lesioned(net: nn.Module, drop) -> nn.Module:
    """A copy of ``net`` with the blocks at indices ``drop`` (into ``blocks(net)``) deleted."""
    out = copy.deepcopy(net)
    targets = [b for i, b in enumerate(blocks(out)) if i in set(drop)]
    for b in targets:
        if not deletable(b):
            raise ValueError("a plain block that changes the shape cannot be deleted (nothing would carry its input)")
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if any(child is t for t in targets):
                setattr(parent, name, Deleted(child.residual, child.shortcut))
    return out
