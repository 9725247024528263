"""He et al.'s own nets, registered as families like every method: the matched plain/residual pairs.

resnet{d}, plain{d}        He et al. 2015: the CIFAR family at d = 6n+2 (resnet.cifar), and the
                           ImageNet-style family at 18, 34, 50, 101, 152 (resnet.imagenet; the CIFAR
                           family at those depths is cifar_resnet{d} / cifar_plain{d})
preresnet{d}, preplain{d}  He et al. 2016, "Identity Mappings": the pre-activation CIFAR nets

Unlike the methods they take every shortcut option (A, B, C), ``zero_init_residual`` (Goyal et al.
2017) and, in the ImageNet-style family, a stem; the report draws them as plain / residual.
"""
from __future__ import annotations

from functools import partial

from torch import nn

from .blocks import SHORTCUTS
from .cifar import cifar_resnet
from .imagenet import imagenet_resnet
from .registry import Family, register

HE2015 = "He et al. 2015"
HE2016 = "He et al. 2016, Identity Mappings"


def he_net(depth: int, *, residual: bool, preact: bool, num_classes: int = 10, width: float = 1.0,
           in_channels: int = 3, shortcut: str = "A", zero_init_residual: bool = False, stem: str = "cifar",
           family: str = "cifar") -> nn.Module:
    common = dict(num_classes=num_classes, residual=residual, shortcut=shortcut, width=width, in_channels=in_channels,
                  zero_init_residual=zero_init_residual)
    if family == "imagenet":
        return imagenet_resnet(depth, stem=stem, **common)
    return cifar_resnet(depth, preact=preact, **common)


for _kind, _residual, _preact in (("resnet", True, False), ("plain", False, False), ("preresnet", True, True),
                                  ("preplain", False, True)):
    register(Family(_kind, partial(he_net, residual=_residual, preact=_preact), residual=_residual,
                    normalization="bn", paper=HE2016 if _preact else HE2015, shortcuts=SHORTCUTS, baseline=True,
                    imagenet=not _preact, pre_activation=_preact, groupable=not _preact, options=("zero_init_residual",) if _preact else ("zero_init_residual", "stem")))
