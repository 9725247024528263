"""Run groups: K CIFAR nets of one shape as one network whose every layer is K-way grouped.

    nets = [resnet.build(name) for name in ("plain20", "resnet20")]   # each built under its own seed
    g = resnet.stack(nets)          # member k's weights are copied in unchanged
    y = g(x)                        # x: (B, K*3, H, W), member k's images in channels 3k..3k+2
                                    # y: (B, K, classes), member k's logits in y[:, k]
    states = resnet.unstack(g)      # K ordinary state dicts for resnet.build(name).load_state_dict

One kernel then does the work of K nets: small CIFAR nets at batch 128 leave a big GPU idle, and a
K-way grouped convolution fills it (the fused-training issue). The layout is member-major: channel
j of member k is channel k*C + j, so

- a convolution with ``groups=K`` never mixes members,
- BatchNorm2d over K*C channels keeps each member's own batch statistics and running averages,
- the head is a batched matrix product with one (classes x C) matrix per member,
- plain and residual members mix: the shortcut is multiplied by a per-member boolean mask (a bool
  tensor takes the other operand's dtype, so under autocast a member computes at the precision it
  has alone; a group of residual members only has no mask at all),
- every activation keeps the memory format of the input (channels_last stays channels_last),
- ``pad_input=P`` zero-pads each member's input to P channels (4 or 8: cuDNN's NHWC tensor-core
  kernels want that many per group, a 3-channel stem falls back to slower ones); the stem's extra
  weights start at zero, see only zero inputs, so get exactly zero gradient and stay zero, and
  ``unstack`` drops them.

The grouped net has the parameter names of the nets it was stacked from, and each of its tensors
is the members' tensors concatenated along the first dimension (stacked, for the head), so
``stack`` and ``unstack`` are exact copies both ways. Trained with the sum of the members' mean
losses and one SGD over the stacked parameters (momentum and weight decay act elementwise), each
member follows the updates it would get alone, up to floating-point re-association.

Supported: the CIFAR family (He et al. 2015 sec. 4.2: basic blocks, post-activation) with
shortcut option A, any depth and width; this is what the paper's Table 6 grid needs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicBlock, PadShortcut
from .net import ResNet


class GroupedPad(nn.Module):
    """Option A for K members at once: subsample, then zero-pad each member's channels (also the
    padded stem's input, with stride 1). The output has the input's memory format."""

    def __init__(self, k: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.k, self.cin, self.extra, self.stride = k, cin, cout - cin, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K*cin, H, W) -> (B, K*cout, H/s, W/s)
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if not self.extra:
            return x
        b, _, h, w = x.shape
        if channels_last:  # pad the innermost (channel) axis of the NHWC layout: the result is NHWC too
            x = F.pad(x.permute(0, 2, 3, 1).reshape(b, h, w, self.k, self.cin), (0, self.extra))
            return x.reshape(b, h, w, self.k * (self.cin + self.extra)).permute(0, 3, 1, 2)
        x = F.pad(x.reshape(b, self.k, self.cin, h, w), (0, 0, 0, 0, 0, self.extra))
        return x.reshape(b, self.k * (self.cin + self.extra), h, w)


class GroupedBasicBlock(nn.Module):
    """K basic blocks; ``residual`` says, per member, whether the shortcut is added."""

    def __init__(self, k: int, cin: int, planes: int, stride: int, residual: list[bool]):
        super().__init__()
        self.conv1 = nn.Conv2d(k * cin, k * planes, 3, stride=stride, padding=1, bias=False, groups=k)
        self.bn1 = nn.BatchNorm2d(k * planes)
        self.conv2 = nn.Conv2d(k * planes, k * planes, 3, padding=1, bias=False, groups=k)
        self.bn2 = nn.BatchNorm2d(k * planes)
        self.shortcut = GroupedPad(k, cin, planes, stride) if stride != 1 or cin != planes else None
        # bool, not float: a float32 mask would promote a bf16 shortcut (and so the whole grouped
        # activation) to float32 under autocast, while the member alone stays bf16
        mask = torch.tensor(residual, dtype=torch.bool).repeat_interleave(planes)[None, :, None, None]
        self.register_buffer("mask", None if all(residual) else mask, persistent=False)  # not a weight: not saved
        self.any_residual = any(residual)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.any_residual:
            shortcut = x if self.shortcut is None else self.shortcut(x)
            out = out + (shortcut if self.mask is None else shortcut * self.mask)
        return F.relu(out)


class GroupedLinear(nn.Module):
    """One linear layer per member: weight (K, out, in), bias (K, out)."""

    def __init__(self, k: int, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, cout, cin))
        self.bias = nn.Parameter(torch.empty(k, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K, in) -> (B, K, out)
        # bias + x W^T in one batched GEMM, as nn.Linear's addmm: under autocast both run (and round) in
        # bf16, where a separate float32 bias would give float32 logits
        return torch.baddbmm(self.bias[:, None], x.transpose(0, 1), self.weight.transpose(1, 2)).transpose(0, 1)


class GroupedResNet(nn.Module):
    """K CIFAR ResNets/plain nets of one shape; build it with ``stack``."""

    def __init__(self, k: int, *, in_channels: int, planes: list[int], blocks: list[int], num_classes: int,
                 residual: list[bool], pad_input: int | None = None):
        super().__init__()
        if pad_input is not None and pad_input < in_channels:
            raise ValueError(f"pad_input must be at least the input's {in_channels} channels, got {pad_input}")
        self.k, self.residual, self.in_channels = k, list(residual), in_channels
        self.stem_in = pad_input or in_channels  # each member's stem input channels, padding included
        self.pad = GroupedPad(k, in_channels, self.stem_in, 1) if self.stem_in > in_channels else None
        self.stem = nn.Sequential(nn.Conv2d(k * self.stem_in, k * planes[0], 3, padding=1, bias=False, groups=k),
                                  nn.BatchNorm2d(k * planes[0]), nn.ReLU(inplace=True))
        cin, stages = planes[0], []
        for i, (p, n) in enumerate(zip(planes, blocks)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(*[GroupedBasicBlock(k, cin if j == 0 else p, p, stride if j == 0 else 1,
                                                            self.residual) for j in range(n)]))
            cin = p
        self.stages = nn.Sequential(*stages)
        self.channels = cin
        self.fc = GroupedLinear(k, cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, K*C_in, H, W) -> (B, K, classes)
        if self.pad is not None:
            x = self.pad(x)
        x = self.stages(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1)  # the lone net's pooling op: the same autocast rule, (B, K*C, 1, 1)
        return self.fc(x.reshape(len(x), self.k, self.channels))

    def merge(self, key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """``merge`` for this group: a padded stem's member weights (and tensors shaped like them) get
        zero input channels."""
        if key == STEM_WEIGHT and self.pad is not None:
            parts = [F.pad(p, (0, 0, 0, 0, 0, self.stem_in - p.shape[1])) for p in parts]
        return merge(key, parts)

    def split(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        """``split`` for this group: views without a padded stem's extra input channels."""
        parts = split(key, value, self.k)
        if key == STEM_WEIGHT and self.pad is not None:
            parts = [p[:, : self.in_channels] for p in parts]
        return parts


def _describe(net: nn.Module) -> dict:
    """The shape of a CIFAR net, or ValueError for what a group cannot hold."""
    if not isinstance(net, ResNet) or not isinstance(net.final, nn.Identity):
        raise ValueError("a run group holds CIFAR-family post-activation nets (resnet{d} / plain{d}) only")
    blocks = [b for stage in net.stages for b in stage]
    if not all(isinstance(b, BasicBlock) for b in blocks):
        raise ValueError("a run group holds basic-block CIFAR nets only")
    if any(b.shortcut is not None and not isinstance(b.shortcut, PadShortcut) for b in blocks):
        raise ValueError("a run group needs shortcut option A (B and C add projections plain twins lack)")
    return dict(in_channels=net.stem[0].in_channels, planes=[stage[0].conv1.out_channels for stage in net.stages],
                blocks=[len(stage) for stage in net.stages], num_classes=net.fc.out_features)


STEM_WEIGHT = "stem.0.weight"


def _is_head(key: str) -> bool:
    return key.startswith("fc.")


def merge(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """The grouped tensor named ``key`` from the members' tensors of that name (weights, buffers, or
    anything shaped like them: gradients, momentum buffers)."""
    if key.endswith("num_batches_tracked"):
        return parts[0].clone()  # members step in lockstep: one count serves all
    return torch.stack(parts) if _is_head(key) else torch.cat(parts)


def split(key: str, value: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The K members' views of the grouped tensor named ``key`` (no copies: writes go through)."""
    if key.endswith("num_batches_tracked"):
        return [value] * k
    return list(value.unbind(0) if _is_head(key) else value.chunk(k, 0))


def member_major(x: torch.Tensor) -> torch.Tensor:
    """K members' inputs (K, B, C, H, W) as one grouped network's input (B, K*C, H, W), member k in channels
    k*C..(k+1)*C-1: the layout every grouped layer reads (and ``split`` undoes). The one place it is spelled."""
    k, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:])


def stack(nets: list[nn.Module], pad_input: int | None = None) -> GroupedResNet:
    """One grouped network holding copies of ``nets`` (same shape; plain and residual may mix);
    ``pad_input``: zero-pad each member's input to that many channels (see the module docstring)."""
    if not nets:
        raise ValueError("a run group needs at least one net")
    shapes = [_describe(n) for n in nets]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"a run group's nets must have one shape (depth, width, classes, input); got {shapes}")
    residual = [n.stages[0][0].residual for n in nets]
    first = next(nets[0].parameters())
    group = GroupedResNet(len(nets), residual=residual, pad_input=pad_input, **shapes[0]).to(first.device, first.dtype)
    states = [n.state_dict() for n in nets]
    group.load_state_dict({key: group.merge(key, [s[key] for s in states]) for key in group.state_dict()})
    return group


def unstack(group: GroupedResNet) -> list[dict[str, torch.Tensor]]:
    """The members' state dicts, with the names and shapes ``resnet.build`` gives them (copies)."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(group.k)]
    for key, value in group.state_dict().items():
        for member, part in zip(out, group.split(key, value)):
            member[key] = part.detach().clone()
    return out


def member_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each member's mean cross-entropy, shape (K,): logits (B, K, classes), targets (B, K)."""
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(0)


def group_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over members of each member's mean cross-entropy: logits (B, K, classes), targets (B, K).

    The sum keeps gradients apart: member k's parameters see exactly d(loss_k)/d(theta_k).
    """
    return member_losses(logits, targets).sum()
