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

from . import methods, tat  # noqa: F401 (they register their families)
from .blocks import SHORTCUTS
from .cifar import cifar_resnet
from .group import GroupedResNet, group_loss, member_losses, stack, unstack
from .lesion import blocks, changes_shape, deletable, lesioned
from .imagenet import LAYOUTS, STEMS, imagenet_resnet
from .registry import PLUGIN_ERRORS, PLUGINS, Family, register
from .registry import family as method
from .registry import kinds as method_kinds
from .stats import count_macs, count_params, layer_responses

__all__ = ["build", "available", "parse", "ModelName", "count_params", "count_macs", "layer_responses",
           "stack", "unstack", "group_loss", "member_losses", "groupable", "GroupedResNet", "blocks", "changes_shape",
           "deletable", "lesioned", "kinds", "method", "Family", "register", "PLUGIN_ERRORS"]

KINDS = ("resnet", "plain", "preresnet", "preplain")  # He et al.'s; the methods and plugins: resnet.registry
CIFAR_EXAMPLES = (8, 14, 20, 32, 44, 56, 110, 1202)
IMAGENET_DEPTHS = tuple(LAYOUTS)
_NAME = re.compile(r"(cifar_)?([a-z][a-z_]*?)(\d+)")


def kinds() -> list[str]:
    """Every kind a name can start with: He et al.'s four, then the registered methods and plugins."""
    return list(KINDS) + method_kinds()


def _families_help() -> str:
    text = ("known families: resnet{d}/plain{d} and preresnet{d}/preplain{d} with CIFAR depth d = 6n+2 "
            f"(e.g. {', '.join(map(str, CIFAR_EXAMPLES))}); resnet/plain{{18,34,50,101,152}} "
            "(ImageNet-style); cifar_resnet{d}/cifar_plain{d} for the CIFAR family at 50 or 152; "
            f"methods and plugins at d = 6n+2: {', '.join(k + '{d}' for k in method_kinds())}")
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
    kind: str  # "resnet" | "plain" | "preresnet" | "preplain", or a registered method's kind
    depth: int  # weighted layers

    @property
    def method(self) -> Family | None:
        """The registered family of a method or plugin kind (None for He et al.'s four)."""
        return None if self.kind in KINDS else method(self.kind)

    @property
    def residual(self) -> bool:
        """A shortcut (or carry) path beside each block: the report's residual side."""
        return self.method.residual if self.method else self.kind in ("resnet", "preresnet")

    @property
    def preact(self) -> bool:
        return self.kind in ("preresnet", "preplain")


def parse(name: str) -> ModelName:
    """Split a network name into family, kind and depth; ValueError with the rules if invalid."""
    m = _NAME.fullmatch(str(name).strip().lower())
    if not m or m.group(2) not in KINDS and method(m.group(2)) is None:
        raise ValueError(f"unknown network {name!r}: {_families_help()}")
    prefix, kind, depth = m.group(1), m.group(2), int(m.group(3))
    if prefix and kind not in ("resnet", "plain"):
        raise ValueError(f"unknown network {name!r}: the cifar_ prefix names resnet{{d}}/plain{{d}} at 50 or 152")
    if not prefix and kind in ("resnet", "plain") and depth in IMAGENET_DEPTHS:
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
    return spec.family == "cifar" and spec.kind in ("resnet", "plain") and (shortcut or "A").upper() == "A"


def lr_scales(name: str) -> tuple[tuple[str, float], ...]:
    """The parameter groups a net trains at another lr ((name regex, factor); the family's, or none)."""
    m = parse(name).method
    return m.lr_scales if m else ()


def available() -> list[str]:
    """Canonical names (any other 6n+2 depth builds too)."""
    names = [f"{k}{d}" for k in KINDS for d in CIFAR_EXAMPLES if d not in IMAGENET_DEPTHS]
    names += [f"cifar_{k}{d}" for k in ("resnet", "plain") for d in (50, 152)]
    names += [f"{k}{d}" for k in ("resnet", "plain") for d in IMAGENET_DEPTHS]
    names += [f"{k}{d}" for k in method_kinds() for d in (20, 56, 110)]
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
    if spec.method is not None:
        return _build_method(spec, num_classes, shortcut, width, in_channels, zero_init_residual, stem)
    _check_sizes(num_classes, width, in_channels)
    shortcut = (shortcut or ("B" if spec.family == "imagenet" else "A")).upper()
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {', '.join(SHORTCUTS)}, got {shortcut!r}")
    common = dict(
        num_classes=num_classes,
        residual=spec.residual,
        shortcut=shortcut,
        width=width,
        in_channels=in_channels,
        zero_init_residual=zero_init_residual,
    )
    if spec.family == "imagenet":
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
        return imagenet_resnet(spec.depth, stem=stem, **common)
    if stem != "cifar":
        raise ValueError(f"{name!r} is a CIFAR-family net: its stem is fixed (the stem option is for resnet18..152)")
    return cifar_resnet(spec.depth, preact=spec.preact, **common)


def _check_sizes(num_classes, width, in_channels) -> None:
    """The arguments every family's builder shares: a clear error for each bad one."""
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not width > 0:
        raise ValueError(f"width must be positive (e.g. 0.5 or 1), got {width!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")


def _build_method(spec: ModelName, num_classes, shortcut, width, in_channels, zero_init_residual, stem) -> nn.Module:
    fam = spec.method
    _check_sizes(num_classes, width, in_channels)
    shortcut = (shortcut or fam.shortcuts[0]).upper()
    if shortcut not in fam.shortcuts:
        raise ValueError(f"{spec.kind} nets are built with shortcut {', '.join(fam.shortcuts)} only, got {shortcut!r}")
    if zero_init_residual:
        raise ValueError(f"zero_init_residual is for resnet/preresnet nets; {spec.kind} has its own initialisation")
    if stem != "cifar":
        raise ValueError(f"{spec.name!r} is a CIFAR-family net: its stem is fixed")
    return fam.build(spec.depth, num_classes=num_classes, width=width, in_channels=in_channels, shortcut=shortcut,
                     **fam.params)
