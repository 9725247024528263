"""The registry of network families: each kind (resnet, plain, fixup, ...) registered once, found by name.

A family is a builder of nets at every CIFAR depth 6n+2 (``fixup56``, ``highway20``), with what the
benchmark needs to know of it: whether it has a shortcut path (the report's plain/residual split),
its normalisation, its hyper-parameters (recorded in each run's row and part of its run_id), the
paper it follows, and, where its code trains some parameters at another learning rate, those
parameter groups (``lr_scales``: name patterns -> factor, a named recipe variant the trainer
applies and the rows record). resnet.build, resnet.parse, `resbench models` and the sweep's
``--models`` read this registry; nothing else keeps a list.

Users register their own families through the entry point group ``resbench.networks`` (an installed
package's ``pyproject.toml``: ``[project.entry-points."resbench.networks"] mynet = "mypkg:register"``)
or a module named by ``RESBENCH_PLUGINS`` (comma-separated): the entry point, or the module's
``register`` function, is called with this module's ``register`` function as its argument.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

NAME = re.compile(r"[a-z][a-z_]*[a-z]")
ENTRY_POINTS = "resbench.networks"


@dataclass(frozen=True)
class Family:
    """One kind of network at every CIFAR depth 6n+2 (He et al.'s resnet and plain also at the ImageNet-style
    depths).

    ``build(depth, *, num_classes, width, in_channels, shortcut, **options)`` returns the net, initialised as
    its paper says (under the caller's torch seed); ``options`` are those the family lists (``options``;
    resnet.build passes ``family="imagenet"`` to a family with ``imagenet`` at those depths).
    """

    kind: str
    build: Callable[..., nn.Module]
    residual: bool  # a shortcut (or carry) path runs beside each block's branch
    normalization: str  # "bn" | "none"
    paper: str
    params: dict = field(default_factory=dict)  # hyper-parameters of the method, recorded and in the run_id
    lr_scales: tuple[tuple[str, float], ...] = ()  # (parameter-name regex, lr factor): another lr for those
    shortcuts: tuple[str, ...] = ("A",)  # shortcut options the family builds
    # where the method's own paper or code trains with another recipe: those Recipe fields (bench.specs), applied
    # by `resbench sweep --method-recipe paper` and recorded (method_recipe = "paper"); {}: the shared recipe
    paper_recipe: dict = field(default_factory=dict)
    package: str | None = None  # a plugin's distribution name and version (recorded, in the run_id)
    version: str | None = None
    # He et al.'s own nets (resnet.baselines): the plain/residual pairs every method is compared with; the report
    # draws them as plain and residual, not under their kind
    baseline: bool = False
    imagenet: bool = False  # also built at the ImageNet-style depths 18..152 (the CIFAR family there: cifar_{kind}{d})
    pre_activation: bool = False  # pre-activation blocks (He et al. 2016): no response after BN before the addition
    groupable: bool = False  # resnet.stack can hold its CIFAR nets (option A): runs of it can train as one group
    options: tuple[str, ...] = ()  # build keywords beyond the shared ones it takes: "zero_init_residual", "stem"

    def __post_init__(self):
        if not NAME.fullmatch(self.kind) or self.kind.startswith("cifar_"):
            raise ValueError(f"a network kind is lower-case letters and underscores, not starting with cifar_ "
                             f"(the CIFAR family's prefix), got {self.kind!r}")
        if self.normalization not in ("bn", "none"):
            raise ValueError(f"normalization must be 'bn' or 'none', got {self.normalization!r}")


FAMILIES: dict[str, Family] = {}
PLUGIN_ERRORS: dict[str, str] = {}  # plugin -> why it could not be loaded (the built-in kinds still work)
PLUGINS: dict[str, str] = {}  # plugin -> "package==version" of each one loaded
_loaded: set[str] = set()  # entry points and modules already called


def register(family: Family) -> Family:
    """Add ``family`` (a kind may be registered once: the built-in kinds are registered when resnet is imported,
    before any plugin)."""
    if family.kind in FAMILIES and FAMILIES[family.kind] is not family:
        raise ValueError(f"network kind {family.kind!r} is already registered")
    FAMILIES[family.kind] = family
    return family


def load_plugins() -> None:
    """Call every installed ``resbench.networks`` entry point and every RESBENCH_PLUGINS module, each once
    (a module named later, by `resbench --plugin`, is loaded at the next call: family() makes it for a kind
    not registered yet, kinds() always). A plugin that fails is named in PLUGIN_ERRORS (and in the error of
    an unknown kind), never raised: the built-in kinds work."""
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        _call(f"entry point {ep.name} ({ep.value})", ep.load,
              (dist.name, dist.version) if dist is not None else (ep.value.split(":")[0], None))
    for module in filter(None, (m.strip() for m in os.environ.get("RESBENCH_PLUGINS", "").split(","))):
        _call(f"module {module}", lambda m=module: _module_register(m), None)


@functools.cache
def _entry_points() -> tuple:
    """The installed ``resbench.networks`` entry points, scanned once per process: the scan reads every
    installed distribution's metadata (~4 ms here), and kinds are looked up thousands of times (diagnose
    parses a run's name per layer and lesion: 43 of its 52 s went to rescanning before this cache)."""
    from importlib.metadata import entry_points

    return tuple(entry_points(group=ENTRY_POINTS))


def _module_register(name: str):
    if name.endswith(".py"):  # a file: imported under its stem
        path = os.path.abspath(name)
        spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
        if spec is None or not os.path.isfile(path):
            raise FileNotFoundError(f"no plugin file {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        name = module.__name__
    else:
        module = importlib.import_module(name)
    if not callable(getattr(module, "register", None)):
        raise AttributeError(f"module {name} has no register(register) function")
    return module.register, (name, getattr(module, "__version__", None))


def _call(what: str, load, origin: tuple[str | None, str | None] | None) -> None:
    if what in _loaded:
        return
    _loaded.add(what)
    try:
        loaded = load()
        if origin is None:  # a module: its name and __version__ come with it
            loaded, origin = loaded
        package, version = origin

        def register_from_plugin(family: Family) -> Family:
            from dataclasses import replace

            return register(family if family.package else replace(family, package=package, version=version))

        loaded(register_from_plugin)
        PLUGINS[what] = f"{package}=={version}"
    except Exception as e:  # a broken plugin must not take the built-in kinds down with it
        PLUGIN_ERRORS[what] = f"{type(e).__name__}: {e}"


def family(kind: str) -> Family | None:
    """The family registered as ``kind``; plugins are loaded only when it is not there yet (a plugin cannot
    re-register a kind, so a kind found is the one every later lookup finds)."""
    if kind not in FAMILIES:
        load_plugins()
    return FAMILIES.get(kind)


def kinds() -> list[str]:
    load_plugins()
    return list(FAMILIES)
