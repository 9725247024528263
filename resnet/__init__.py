"""resnet: the networks of resbench, and nothing else (no I/O, no training, no CLI).

    >>> import resnet
    >>> net = resnet.build("plain56", width=0.5)
    >>> resnet.parse("resnet110").depth
    110

Names:
  resnet{d}, plain{d}                 He et al. 2015 CIFAR nets, d = 6n+2 (20, 32, 44, 56, 110, ...)
  preresnet{d}, preplain{d}           pre-activation variant (He et al. 2016), d = 6n+2
  resnet18/34/50/101/152, plain18...  the ImageNet-style family (64..512 planes)
  cifar_resnet{d}, cifar_plain{d}     the CIFAR family at any 6n+2 depth, also 50 and 152
  highway{d}, fixup{d}, skipinit{d},  degradation fixes on the same CIFAR topology (resnet.methods,
  rezero{d}, dirac{d}, tat{d}         resnet.tat), and any family a plugin registers (resnet.registry)
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import baselines, methods, tat  # noqa: F401 (they register their families, He et al.'s first)
from .group import GroupedResNet, group_loss, member_losses, stack, unstack
from .lesion import blocks, changes_shape, deletable, lesioned
from .imagenet import LAYOUTS, STEMS
from .registry import PLUGIN_ERRORS, PLUGINS, Family, register
from .registry import family as method
from .registry import kinds as method_kinds
from .stats import count_macs, count_params, layer_responses

__all__ = ["build", "available", "parse", "ModelName", "count_params", "count_macs", "layer_responses",
           "stack", "unstack", "group_loss", "member_losses", "groupable", "GroupedResNet", "blocks", "changes_shape",
           "deletable", "lesioned", "kinds", "baseline_kinds", "method", "Family", "register", "PLUGIN_ERRORS"]

CIFAR_EXAMPLES = (8, 14, 20, 32, 44, 56, 110, 1202)
IMAGENET_DEPTHS = tuple(LAYOUTS)
_NAME = re.compile(r"(cifar_)?([a-z][a-z_]*?)(\d+)")


def kinds() -> list[str]:
    """Every kind a name can start with, in the registry's order: He et al.'s four, the methods, the plugins."""
    return method_kinds()


def baseline_kinds() -> list[str]:
    """He et al.'s kinds (resnet, plain, preresnet, preplain): the report's plain and residual nets."""
    return [k for k in method_kinds() if method(k).baseline]


def _families_help() -> str:
    text = ("known families: resnet{d}/plain{d} and preresnet{d}/preplain{d} with CIFAR depth d = 6n+2 "
            f"(e.g. {', '.join(map(str, CIFAR_EXAMPLES))}); resnet/plain{{18,34,50,101,152}} "
            "(ImageNet-style); cifar_resnet{d}/cifar_plain{d} for the CIFAR family at 50 or 152; "
            f"methods and plugins at d = 6n+2: {', '.join(k + '{d}' for k in kinds() if not method(k).baseline)}")
    if PLUGINS:
        text += "; plugins loaded: " + ", ".join(PLUGINS.values())
    if PLUGIN_ERRORS:
        text += "; plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in PLUGIN_ERRORS.items())
    return text


@dataclass(frozen=True)
class ModelName:
    """A parsed network name."""

    name: str
    family: str  # "cifar" | "imagenet"
    kind: str  # a registered kind: "resnet" | "plain" | "preresnet" | "preplain", a method's or a plugin's
    depth: int  # weighted layers

    @property
    def method(self) -> Family:
        """The kind's registered family (He et al.'s kinds, the methods and plugins alike)."""
        return method(self.kind)

    @property
    def residual(self) -> bool:
        """A shortcut (or carry) path beside each block: the report's residual side."""
        return self.method.residual

    @property
    def preact(self) -> bool:
        return self.method.pre_activation


def parse(name: str) -> ModelName:
    """Split a network name into family, kind and depth; ValueError with the rules if invalid."""
    m = _NAME.fullmatch(str(name).strip().lower())
    fam = method(m.group(2)) if m else None
    if fam is None:
        raise ValueError(f"unknown network {name!r}: {_families_help()}")
    prefix, kind, depth = m.group(1), m.group(2), int(m.group(3))
    if prefix and not fam.imagenet:
        raise ValueError(f"unknown network {name!r}: the cifar_ prefix names resnet{{d}}/plain{{d}} at 50 or 152")
    if not prefix and fam.imagenet and depth in IMAGENET_DEPTHS:
        return ModelName(name, "imagenet", kind, depth)
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"invalid depth in {name!r}: CIFAR depths are 6n+2 with n >= 1 "
            f"(e.g. {', '.join(map(str, CIFAR_EXAMPLES))}); the ImageNet-style family "
            f"(resnet/plain only) has {', '.join(map(str, IMAGENET_DEPTHS))}"
        )
    return ModelName(name, "cifar", kind, depth)


def groupable(name: str, shortcut: str | None = None) -> bool:
    """Whether ``stack`` can hold this net: the CIFAR family's post-activation basic-block nets with
    shortcut option A (the paper's Table 6 grid); the methods train alone."""
    spec = parse(name)
    return spec.family == "cifar" and spec.method.groupable and (shortcut or "A").upper() == "A"


def lr_scales(name: str) -> tuple[tuple[str, float], ...]:
    """The parameter groups a net trains at another lr ((name regex, factor); none for most families)."""
    return parse(name).method.lr_scales


def available() -> list[str]:
    """Canonical names (any other 6n+2 depth builds too)."""
    he, wide = baseline_kinds(), [k for k in kinds() if method(k).imagenet]
    names = [f"{k}{d}" for k in he for d in CIFAR_EXAMPLES if d not in IMAGENET_DEPTHS]
    names += [f"cifar_{k}{d}" for k in wide for d in (50, 152)]
    names += [f"{k}{d}" for k in wide for d in IMAGENET_DEPTHS]
    names += [f"{k}{d}" for k in kinds() if k not in he for d in (20, 56, 110)]
    return names


def build(
    name: str,
    num_classes: int = 10,
    *,
    shortcut: str | None = None,
    width: float = 1.0,
    in_channels: int = 3,
    zero_init_residual: bool = False,
    stem: str = "cifar",
) -> nn.Module:
    """Build a network by name.

    Args:
        name: see the module docstring; ``available()`` lists canonical ones.
        num_classes: outputs of the final linear layer.
        shortcut: "A" (parameter-free, the CIFAR default), "B" (projection where the shape
            changes, the ImageNet-style default) or "C" (projection everywhere).
        width: channel multiplier (0.5 gives 8/16/32 filters in the CIFAR family).
        in_channels: image channels (1 for Fashion-MNIST).
        zero_init_residual: zero-init the last BN gamma of each residual branch.
        stem: ImageNet-style family only: "cifar" (3x3, for 32x32) or "imagenet" (7x7/2 + max-pool).
    """
    spec = parse(name)
    fam = spec.method
    _check_sizes(num_classes, width, in_channels)
    shortcut = (shortcut or ("B" if spec.family == "imagenet" else fam.shortcuts[0])).upper()
    if shortcut not in fam.shortcuts:
        raise ValueError(f"shortcut must be one of {', '.join(fam.shortcuts)} for {spec.kind} nets, got {shortcut!r}")
    if zero_init_residual and "zero_init_residual" not in fam.options:
        raise ValueError(f"zero_init_residual is for resnet/preresnet nets; {spec.kind} has its own initialisation")
    if spec.family != "imagenet" and stem != "cifar":
        raise ValueError(f"{name!r} is a CIFAR-family net: its stem is fixed (the stem option is for resnet18..152)")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    given = dict(zero_init_residual=zero_init_residual, stem=stem)
    options = {k: v for k, v in given.items() if k in fam.options}
    if spec.family == "imagenet":
        options["family"] = "imagenet"
    return fam.build(spec.depth, num_classes=num_classes, width=width, in_channels=in_channels, shortcut=shortcut,
                     **fam.params, **options)


def _check_sizes(num_classes, width, in_channels) -> None:
    """The arguments every family's builder shares: a clear error for each bad one."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not width > 0:
        raise ValueError(f"width must be positive (e.g. 0.5 or 1), got {width!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
