"""TAT: Zhang, Botev, Martens 2022, "Deep Learning without Shortcuts: Shaping the Kernel with Tailored
Rectifiers", on He et al.'s plain CIFAR topology: no shortcut, no BN.

Every activation is a leaky ReLU whose negative slope is solved, by DeepMind's ``dks`` package
(PyPI ``dks[pytorch]``), for the whole net's depth so that the net's C map has C_f(0) =
``c_val_0_target`` (0.9 by default, the paper's and dks's), times dks's output scale
sqrt(2 / (1 + slope^2)) (so Q(1) = 1). The net is a chain of depth - 1 nonlinear layers (the stem
and two per block), which is the "subnetwork maximising function" dks asks for. Convs get dks's
Delta-orthogonal initialisation (scaled uniform orthogonal in the kernel's centre, zero elsewhere)
and zero biases; the classifier dks's scaled uniform orthogonal one. Deleted (a shape-keeping
block), as in a plain net: the identity.

``dks`` is imported when a TAT net is built, so ``resnet`` itself works where it is not installed.
"""
from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .methods import BranchBlock, cifar_net, conv3x3_bias
from .registry import Family, register

C_VAL_0_TARGET = 0.9


@functools.cache
def leaky_relu_params(nonlinear_layers: int, c_val_0_target: float = C_VAL_0_TARGET) -> tuple[float, float]:
    """(negative slope, output scale) that dks's TAT gives a chain of ``nonlinear_layers`` leaky ReLUs,
    read off the transformed activation it returns: f(1) = scale, f(-1) = -scale x slope."""
    try:
        from dks.pytorch.activation_transform import get_transformed_activations
    except ImportError as e:
        raise ImportError("TAT nets need DeepMind's dks package: pip install 'dks[pytorch]' absl-py") from e

    def chain(x, local_map):  # the C map of the longest path: every nonlinear layer in turn
        for _ in range(nonlinear_layers):
            x = local_map(x)
        return x

    try:
        act = get_transformed_activations(["leaky_relu"], method="TAT", tat_params=dict(c_val_0_target=c_val_0_target),
                                          subnet_max_func=chain)["leaky_relu"]
    except ValueError as e:  # dks: no slope reaches the target (a chain this short is too linear even as ReLUs)
        raise ValueError(f"TAT cannot reach its target C(0) = {c_val_0_target} with {nonlinear_layers} leaky-ReLU "
                         f"layers (depth {nonlinear_layers + 1}): dks finds no negative slope that does (with 0.9, "
                         f"tat nets start at depth 14)") from e
    at = act(torch.tensor([-1.0, 1.0], dtype=torch.float64))
    return float(-at[0] / at[1]), float(at[1])


class TailoredReLU(nn.Module):
    """scale x leaky_relu(x, slope), the activation dks transforms for TAT."""

    def __init__(self, slope: float, scale: float):
        super().__init__()
        self.slope, self.scale = slope, scale

    def forward(self, x):
        return self.scale * F.leaky_relu(x, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope:.6f}, scale={self.scale:.6f}"


class TATBlock(BranchBlock):
    """conv-act-conv-act with biases, no BN, no shortcut."""

    def __init__(self, cin: int, planes: int, stride: int = 1, *, residual: bool = False, shortcut: str = "A",
                 act: tuple[float, float] = (0.0, 1.0)):
        super().__init__(cin, planes, stride, residual=residual, shortcut=shortcut, conv=conv3x3_bias, bn=False)
        self.act1 = TailoredReLU(*act)
        self.act2 = TailoredReLU(*act)

    def forward(self, x):
        return self.act2(self.conv2(self.act1(self.conv1(x))))


def delta_orthogonal_(weight: torch.Tensor) -> torch.Tensor:
    """dks's Delta-orthogonal (scaled uniform orthogonal) initialisation, in place."""
    from dks.pytorch.parameter_sampling_functions import scaled_uniform_orthogonal_

    with warnings.catch_warnings():  # dks 0.1.2 indexes with a list, which torch warns of
        warnings.simplefilter("ignore", UserWarning)
        return scaled_uniform_orthogonal_(weight, delta=weight.dim() > 2)


def tat_net(depth: int, *, num_classes: int = 10, width: float = 1.0, in_channels: int = 3, shortcut: str = "A",
            c_val_0_target: float = C_VAL_0_TARGET) -> nn.Module:
    act = leaky_relu_params(depth - 1, c_val_0_target)
    from .cifar import CIFAR_WIDTHS, scaled

    planes0 = scaled(CIFAR_WIDTHS[0], width)
    stem = nn.Sequential(nn.Conv2d(in_channels, planes0, 3, padding=1), TailoredReLU(*act))
    net = cifar_net(depth, TATBlock, num_classes=num_classes, width=width, in_channels=in_channels, residual=False,
                    stem=stem, block_kwargs=dict(act=act))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                delta_orthogonal_(m.weight)
                nn.init.zeros_(m.bias)
    net.derived = dict(negative_slope=act[0], output_scale=act[1])  # recorded in the run's row
    return net


# dks's README: inputs through per-location normalisation (its data_preprocessing), after the usual standardization.
# The paper's lr was tuned per optimiser on ImageNet: no value carries over (tune it: --lr-grid, or --lr-for)
register(Family("tat", tat_net, residual=False, normalization="none", params=dict(c_val_0_target=C_VAL_0_TARGET),
                paper="Zhang, Botev, Martens 2022, Deep Learning without Shortcuts (TAT; DeepMind's dks)",
                paper_recipe=dict(normalize="pln")))
