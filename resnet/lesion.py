"""Lesions (Veit, Wilber and Belongie 2016): a net with some of its blocks deleted, at test time.

A deleted block becomes what its ``deleted()`` says is left (resnet.blocks.Block): for a residual
block its shortcut (and the ReLU after the addition, in post-activation blocks), which is exactly
the block with its residual branch set to zero; for a plain block the identity, possible only where
its input and output shapes match. The degradation fixes (resnet.methods) say what is left of
theirs: a highway block's carry path, a ReZero/SkipInit/Fixup block's shortcut.
"""
from __future__ import annotations

import copy

from torch import nn

from .blocks import Block


def blocks(net: nn.Module) -> list[Block]:
    """The net's blocks in order."""
    return [m for m in net.modules() if isinstance(m, Block)]


def changes_shape(block: Block) -> bool:
    """Whether the block's output has another shape than its input (a stage's first, downsampling block;
    in bottleneck nets also the first block of the first stage, which widens the channels)."""
    return block.changes_shape()


def deletable(block: Block) -> bool:
    """Whether deleting the block leaves a working net (see the module docstring)."""
    return block.residual or not changes_shape(block)


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
                setattr(parent, name, child.deleted())
    return out
