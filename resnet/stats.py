"""Model statistics: parameters, multiply-adds and per-layer responses (no I/O).

Multiply-adds count conv and linear layers only (BN, ReLU, additions and pooling are
negligible and uncounted), the convention of He et al. 2015 Table 6 ("FLOPs") and of most
papers since.
"""
from __future__ import annotations

import torch
from torch import nn


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@torch.no_grad()
def count_macs(net: nn.Module, input_size: tuple[int, int, int] = (3, 32, 32)) -> int:
    """Forward multiply-adds for one image of shape ``input_size`` (C, H, W)."""
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out[0].numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += m.in_features * m.out_features

    hooks = [
        m.register_forward_hook(conv_hook if isinstance(m, nn.Conv2d) else linear_hook)
        for m in net.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    was_training = net.training
    try:
        net.eval()
        p = next(net.parameters())
        net(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return total


def response_layers(net: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The BN layer after each 3x3 conv, in forward order (shortcut projections excluded).

    Its output is the layer "response" of He et al. 2015 Fig. 7: after BN, before the addition
    and the ReLU.
    """
    convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}
    layers, prev = [], None
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d):
            prev = name
        elif isinstance(m, nn.BatchNorm2d) and prev in convs and "shortcut" not in name:
            layers.append((name, m))
            prev = None
    return layers


@torch.no_grad()
def layer_responses(net: nn.Module, batches) -> list[tuple[str, float]]:
    """Std of each 3x3 conv layer's response (He et al. 2015 Fig. 7) over ``batches`` of images.

    The std is taken per channel over all images and positions, then averaged over channels,
    as in the paper ("std of each layer's responses").
    """
    layers = response_layers(net)
    sums = {n: None for n, _ in layers}
    count = {n: 0 for n, _ in layers}

    def hook_for(name):
        def hook(_m, _inp, out):
            x = out.float().transpose(0, 1).flatten(1)  # (C, B*H*W)
            s = torch.stack([x.sum(1), (x * x).sum(1)])
            sums[name] = s if sums[name] is None else sums[name] + s
            count[name] += x.shape[1]

        return hook

    hooks = [m.register_forward_hook(hook_for(n)) for n, m in layers]
    was_training = net.training
    try:
        net.eval()
        for x in batches:
            net(x)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    out = []
    for n, _ in layers:
        s1, s2 = sums[n]
        mean = s1 / count[n]
        var = (s2 / count[n] - mean * mean).clamp_min(0)
        out.append((n, var.sqrt().mean().item()))
    return out
