"""The command line's options, each declared once: typed option groups, frozen dataclasses whose fields are
Click options (``opt``), shown in ``--help`` under the group's heading and taken as keys by ``--config FILE.toml``
(the option's name, dashes or underscores). A command is decorated with its groups (``with_groups``) and
takes each back as a typed value (``Group.take``); tests/bench/test_options.py checks that every Click option of
sweep, run and profile is a field of one of its groups and a key its --config takes.

No torch here: ``resbench --help`` reads this module (tests/test_layout.py).
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import click

from bench.datasets import DATASETS
from bench.specs import FUSE_HELP, Fuse


# -- parsing ------------------------------------------------------------------------------------------

def csv_list(cast, minimum=None, example: str = "20,32,44", ranges: bool = False):
    """A comma-separated option; with ``minimum``, every item must be at least that; with ``ranges``, "0-4"
    stands for 0,1,2,3,4 (seeds)."""

    def item(v: str):
        if ranges and re.fullmatch(r"\d+-\d+", v):
            lo, hi = map(int, v.split("-"))
            if hi < lo:
                raise ValueError(v)
            return tuple(range(lo, hi + 1))
        return (cast(v),)

    def callback(_ctx, param, value):
        if value is None:
            return None
        try:
            items = tuple(x for v in str(value).split(",") if v.strip() for x in item(v.strip()))
        except ValueError:
            raise click.BadParameter(f"expected a comma-separated list such as {example}, got {value!r}") from None
        low = [v for v in items if minimum is not None and v < minimum]
        if low:
            raise click.BadParameter(f"every value must be >= {minimum}, got {', '.join(map(str, low))}")
        return items

    return callback


COUNT = click.IntRange(min=1)  # how many of something: zero or fewer is a mistake, caught before anything runs
POSITIVE = click.FloatRange(min=0, min_open=True)


class FuseType(click.ParamType):
    """--fuse auto|off|K, parsed here once into a bench.specs.Fuse."""

    name = "auto|off|K"

    def convert(self, value, param, ctx):
        try:
            return Fuse.of(value)
        except ValueError as e:
            self.fail(str(e).removeprefix("--fuse "), param, ctx)


def _kind_values(_ctx, _param, value):
    """--lr-for fixup=0.1,tat=0.005 -> (("fixup", 0.1), ("tat", 0.005)); a TOML table works too."""
    if value is None:
        return None
    pairs = value.items() if isinstance(value, dict) else (p.partition("=")[::2] for p in str(value).split(",") if p.strip())
    out = []
    for kind, lr in pairs:
        try:
            out.append((str(kind).strip(), float(lr)))
        except ValueError:
            raise click.BadParameter(f"expected KIND=VALUE,..., e.g. fixup=0.1,tat=0.005, got {value!r}") from None
    return tuple(out)


def _kind_grids(_ctx, _param, value):
    """--lr-grid-for tat=0.0005:0.001:0.002,fixup=0.05:0.1 -> (("tat", (0.0005, 0.001, 0.002)), ...); in a TOML
    file a table of lists (lr-grid-for = {tat = [0.0005, 0.001]})."""
    if value is None:
        return None
    out = []
    for kind, grid in (p.partition("=")[::2] for p in str(value).split(",") if p.strip()):
        try:
            lrs = tuple(float(v) for v in grid.strip().strip("[]").replace(" ", "").replace(";", ":").split(":") if v)
        except ValueError:
            lrs = None
        if not kind.strip() or not lrs:
            raise click.BadParameter(f"expected KIND=LR:LR:...,..., e.g. tat=0.0005:0.001:0.002, got {value!r}")
        out.append((kind.strip(), lrs))
    return tuple(out)


def _lr_grid(_ctx, _param, value):
    """--lr-grid LR,... -> a tuple of floats; "preset" -> the string "preset" (Methods.grid resolves it)."""
    if value is None or str(value).strip() == "preset":
        return None if value is None else "preset"
    return csv_list(float)(None, None, value)


# -- help texts from the data they describe -------------------------------------------------------------

def presets() -> list[str]:
    from bench.specs import PRESETS

    return list(PRESETS)


def preset_defaults(field_name: str) -> str:
    """Each preset's value of a recipe or grid field, as help text: 'he2015 64000, quick 6400, smoke 400'."""
    from bench.specs import PRESETS, RECIPES

    def text(v):
        if v is None:
            return "all"
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "none"
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = {name: p[field_name] if field_name in p else getattr(RECIPES[p["recipe"]], field_name)
              for name, p in PRESETS.items()}
    if len({text(v) for v in values.values()}) == 1:  # every preset's: said once
        return text(next(iter(values.values())))
    return ", ".join(f"{name} {text(v)}" for name, v in values.items())


def profile_defaults(key: str) -> str:
    """What `resbench profile` measures when not told, per device, as help text."""
    from bench.profile_tables import DEFAULTS

    cpu, cuda = (",".join(map(str, DEFAULTS[d][key])) if isinstance(DEFAULTS[d][key], tuple) else str(DEFAULTS[d][key])
                 for d in ("cpu", "cuda"))
    return cpu if cpu == cuda else f"{cpu} on the CPU; {cuda} on CUDA"


def _grids_help() -> str:
    from bench.specs import LR_GRIDS

    return "; ".join(f"{k} {min(g):g}..{max(g):g}, {len(g)} values x2 apart" for k, g in LR_GRIDS.items())


# -- declaring options ----------------------------------------------------------------------------------

class Renamed(click.Option):
    """An option whose earlier name still works for a release (README, "Renamed options"), not shown in --help
    (nor accepted twice: it is the same option)."""

    def __init__(self, *args, old: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.old = old

    def get_help_record(self, ctx):
        opts, self.opts = self.opts, [o for o in self.opts if o != self.old]
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts


def renamed(new: str, old: str, name: str, **kwargs):
    """click.option(new, old, name, ...) with ``old`` hidden (Renamed)."""
    return click.option(new, old, name, cls=Renamed, old=old, **kwargs)


def opt(*decls: str, default=None, old: str | None = None, **click_kw):
    """A field that is a command-line option: ``decls`` as click.option takes them (the field's name is the
    parameter's), ``old`` an earlier name still accepted (Renamed), the rest Click's keywords."""
    return field(default=default, metadata=dict(decls=decls, old=old, click=click_kw))


@dataclass(frozen=True)
class Group:
    """A group of options: its fields in the order --help shows them, under ``heading``."""

    heading: ClassVar[str]

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def decorate(cls, fn):
        for f in reversed(fields(cls)):
            meta = f.metadata  # every field is an ``opt``: it has a default
            if meta["old"]:
                fn = renamed(*meta["decls"], meta["old"], f.name, default=f.default, **meta["click"])(fn)
            else:
                fn = click.option(*meta["decls"], f.name, default=f.default, **meta["click"])(fn)
        return fn

    @classmethod
    def take(cls, o: dict):
        """The group's values out of a command's keyword arguments (removed from ``o``)."""
        return cls(**{n: o.pop(n) for n in cls.names()})


def with_groups(*groups: type[Group]):
    """Decorate a command with each group's options, in order (``sections`` gives its help headings)."""

    def decorate(fn):
        for g in reversed(groups):
            fn = g.decorate(fn)
        return fn

    return decorate


def sections(*groups: type[Group], first: dict[str, list[str]] | None = None) -> dict[str, list[str]]:
    """heading -> parameter names, in the groups' order (``first``: names shown before a heading's fields)."""
    out: dict[str, list[str]] = {}
    for g in groups:
        out.setdefault(g.heading, list((first or {}).get(g.heading, []))).extend(g.names())
    return out


def load_config(ctx: click.Context, _param, path: str | None):
    """--config FILE.toml: its keys are option names (dashes or underscores) and become defaults."""
    if not path:
        return None
    try:
        conf = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise click.BadParameter(f"{path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise click.BadParameter(f"{path} is not valid TOML: {e}") from None
    # lists become the comma-separated text the options parse, tables KEY=VALUE pairs (lr-for = {fixup = 0.1})
    conf = {k.replace("-", "_"): ",".join(map(str, v)) if isinstance(v, list) else
            ",".join(f"{a}={':'.join(map(str, b)) if isinstance(b, list) else b}" for a, b in v.items())
            if isinstance(v, dict) else v for k, v in conf.items()}
    keys = config_keys(ctx.command)
    unknown = sorted(set(conf) - set(keys))
    if unknown:
        raise click.BadParameter(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys are the options of "
                                 f"'resbench {ctx.info_name}' (see --help)")
    conf = {keys[k]: v for k, v in conf.items()}
    ctx.default_map = {**(ctx.default_map or {}), **conf}
    return path


def config_keys(command: click.Command) -> dict[str, str]:
    """The keys a --config file of ``command`` takes (underscores; dashes work too) -> the option's parameter: each
    option's long names (--time: time, an earlier name too) and its parameter's name (time_min)."""
    keys = {}
    for p in command.params:
        if isinstance(p, click.Option) and p.expose_value:
            for name in [p.name] + [o for o in p.opts + p.secondary_opts if o.startswith("--")]:
                keys[name.lstrip("-").replace("-", "_")] = p.name
    return {k: v for k, v in keys.items() if not k.startswith("no_")}  # --no-amp: the key is amp = false


# -- the groups --------------------------------------------------------------------------------------------

def _preset():
    return opt("--preset", type=click.Choice(presets()), default="smoke", help="Recipe and grid defaults (see README).")


def _width():
    return opt("--width", type=POSITIVE, help=f"Channel multiplier  [default: {preset_defaults('width')}]")


def _shortcut():
    return opt("--shortcut", type=click.Choice(["A", "B", "C"], case_sensitive=False), default="A")


def _out():
    return opt("--out", type=click.Path(path_type=Path), help="[default: results/<preset>]")


@dataclass(frozen=True)
class SweepGrid(Group):
    heading: ClassVar[str] = "What to train"
    preset: str = _preset()
    kinds: tuple[str, ...] | None = opt(
        "--kinds", old="--models", callback=csv_list(str),
        help="Network kinds: resnet, plain (He et al.), preresnet, preplain (He et al. 2016), the methods (highway, "
             "fixup, skipinit, rezero, dirac, tat) and plugins' (`resbench models --kinds all` lists them)  "
             f"[default: {preset_defaults('models')}]")
    depths: tuple[int, ...] | None = opt(
        "--depths", callback=csv_list(int),
        help="Depths: 6n+2 (8, 20, 32, ...: the CIFAR family) on CIFAR-like data; 18, 34, 50, 101, 152 (the "
             f"ImageNet-style family) on ImageNet-style data  [default: {preset_defaults('depths')}]")
    seeds: tuple[int, ...] | None = opt(
        "--seeds", callback=csv_list(int, minimum=0, example="0,1,2 or 0-4", ranges=True),
        help=f"Seeds, one run of each net per seed: 0,1,2 or 0-4  [default: {preset_defaults('seeds')}]")
    width: float | None = _width()
    shortcut: str = _shortcut()
    out: Path | None = _out()
    name: str | None = opt("--name", help="Sweep name in the records  [default: the preset]")


@dataclass(frozen=True)
class RunTarget(Group):
    heading: ClassVar[str] = "What to train"
    preset: str = _preset()
    seed: int = opt("--seed", type=click.IntRange(min=0), default=0)
    width: float | None = _width()
    shortcut: str = _shortcut()
    out: Path | None = _out()


@dataclass(frozen=True)
class Methods(Group):
    heading: ClassVar[str] = "Methods compared"
    lr_for: tuple | None = opt(
        "--lr-for", callback=_kind_values, metavar="KIND=LR,...",
        help="Kinds trained at their own lr, e.g. fixup=0.1,tat=0.005 (the others at --lr); in the run_id.")
    lr_grid: tuple[float, ...] | str | None = opt(
        "--lr-grid", callback=_lr_grid, metavar="LR,...|preset",
        help="Tune the lr: for each kind and depth, train every lr on the grid seeds, then the one with the "
             "lowest validation error on the other seeds; a choice at an edge widens the grid x2 (at most twice "
             "a side) ('preset': " + _grids_help() + ").")
    grid_seeds: int = opt(
        "--grid-seeds", type=COUNT, default=1, show_default=True,
        help="A tuned sweep: how many of the first --seeds train the lr grid; the results are the other seeds "
             "(never a seed that took part in the choice).")
    lr_grid_widen: int = opt(
        "--lr-grid-widen", type=click.IntRange(min=0), default=2, show_default=True,
        help="A tuned sweep: factor-2 steps a cell's grid may grow at an end where its choice sits (0: never).")
    lr_grid_for: tuple | None = opt(
        "--lr-grid-for", callback=_kind_grids, metavar="KIND=LR:LR:...,...",
        help="Kinds tuned on a grid of their own, e.g. tat=0.0005:0.001:0.002 (the others on --lr-grid).")
    weight_decay_for: tuple | None = opt(
        "--weight-decay-for", callback=_kind_values, metavar="KIND=WD,...",
        help="Kinds trained with their own weight decay, e.g. tat=0,fixup=5e-4 (the others at --weight-decay); "
             "in the run_id.")
    method_recipe: str = opt(
        "--method-recipe", type=click.Choice(["matched", "paper"]), default="matched",
        help="matched: every kind on the one recipe; paper: each method with its own paper's settings where "
             "they differ (fixup: standardized input and mixup; dirac: no decay on 1-D parameters; tat: "
             "per-location normalisation).")

    def grid(self, preset: str) -> tuple[float, ...]:
        """The lr grid asked for: the preset's where --lr-grid preset; () when not tuning."""
        from bench.specs import LR_GRIDS

        if self.lr_grid != "preset":
            return self.lr_grid or ()
        if preset not in LR_GRIDS:
            raise click.BadParameter(f"preset {preset} has no lr grid; give the lrs, e.g. 0.025,0.05,0.1,0.2",
                                     param_hint="--lr-grid")
        return LR_GRIDS[preset]


def _recipe_opt(name: str, field_name: str, typ, text: str):
    return opt(name, type=typ, help=f"{text}  [default: {preset_defaults(field_name)}]")


@dataclass(frozen=True)
class RecipeOverrides(Group):
    """Fields of the preset's recipe (bench.specs.Recipe, the same names), each overriding it when given."""

    heading: ClassVar[str] = "Recipe (overrides the preset's)"
    iterations: int | None = _recipe_opt(
        "--iterations", "iterations", COUNT, "Total optimizer steps (epochs where the preset's schedule counts epochs).")
    batch_size: int | None = _recipe_opt("--batch-size", "batch_size", COUNT, "Training batch size.")
    lr: float | None = _recipe_opt("--lr", "lr", POSITIVE, "Base learning rate.")
    milestones: str | None = _recipe_opt(
        "--milestones", "milestones", str, "Steps (or epochs) at which lr is divided by 10, e.g. 32000,48000 ('' for "
                                           "none).")
    schedule: str | None = _recipe_opt(
        "--schedule", "schedule", click.Choice(["step", "cosine"]),
        "The lr schedule: step (/10 at each milestone, the paper's) or cosine (to 0 at the last step).")
    momentum: float | None = _recipe_opt("--momentum", "momentum", click.FloatRange(0, 1, max_open=True), "SGD momentum.")
    weight_decay: float | None = _recipe_opt(
        "--weight-decay", "weight_decay", click.FloatRange(min=0), "L2 weight decay (on every parameter unless "
                                                                    "--no-decay-1d).")
    warmup_iters: int | None = _recipe_opt(
        "--warmup", "warmup_iters", click.IntRange(min=0), "Steps at --warmup-lr first, for nets of --warmup-min-depth "
                                                           "layers or more (0: none).")
    warmup_lr: float | None = _recipe_opt("--warmup-lr", "warmup_lr", POSITIVE, "The warm-up's learning rate.")
    warmup_min_depth: int | None = _recipe_opt("--warmup-min-depth", "warmup_min_depth", COUNT,
                                               "Nets at least this deep warm up.")
    normalize: str | None = _recipe_opt(
        "--normalize", "normalize", click.Choice(["pixel-mean", "standardize", "pln"]),
        "Input: pixel-mean (He et al.: minus the per-pixel mean image), standardize (per channel to unit variance), "
        "pln (standardize, then dks's per-location normalisation: one input channel more).")
    mixup: float | None = _recipe_opt("--mixup", "mixup", click.FloatRange(min=0),
                                      "mixup's Beta(a, a) parameter a (0: off; Fixup's code: 1).")
    train_size: int | None = _recipe_opt(
        "--train-size", "train_size", COUNT, "Train on the first N images of the training split (the 50k training "
                                             "images less --val-size).")
    val_size: int | None = _recipe_opt("--val-size", "val_size", click.IntRange(min=0),
                                       "Validation images held out of the training set (0: train on all).")
    test_size: int | None = _recipe_opt("--test-size", "test_size", COUNT, "Evaluate on the first N test images.")
    eval_every: int | None = _recipe_opt(
        "--eval-every", "eval_every", COUNT, "Steps (or epochs) between evaluation points (curve rows and checkpoints).")
    decay_1d: bool | None = opt(
        "--decay-1d/--no-decay-1d",
        help="Weight decay also on 1-D parameters (biases, BN's affine, per-channel scales); --no-decay-1d as "
             "DiracNet's code  [default: on]")
    lighting: bool | None = opt(
        "--lighting/--no-lighting",
        help="ImageNet-style data: Krizhevsky et al.'s colour augmentation (PCA lighting), the paper's 'standard "
             f"color augmentation'  [default: {preset_defaults('lighting')}]")

    # Recipe fields no option sets: the recipe's name (the preset's), the decay factor (always /10 in the
    # presets) and what a preset fixes for its data (ImageNet's 10-crop test, epochs as the schedule's unit)
    FIXED: ClassVar[tuple[str, ...]] = ("name", "lr_decay", "ten_crop", "schedule_in")

    def recipe(self, preset: str):
        """The preset's recipe with the fields given here."""
        from bench.specs import PRESETS, recipe

        given = {f: getattr(self, f) for f in self.names()}
        if given["milestones"] is not None:
            given["milestones"] = csv_list(int)(None, None, given["milestones"]) or ()
        return recipe(PRESETS[preset]["recipe"], **given)


@dataclass(frozen=True)
class DataOptions(Group):
    heading: ClassVar[str] = "Data"
    dataset: str | None = opt(
        "--dataset", type=click.Choice(DATASETS),
        help="[default: the preset's: cifar10, imagenet for he2015-imagenet, imagenette for imagenette]")
    data_root: Path | None = opt("--data-root", type=click.Path(path_type=Path),
                                 help="Folder or archive with the data set  [default: $RESBENCH_DATA]")
    download: bool = opt("--download", is_flag=True, default=False, help="Fetch the data set with torchvision if not found.")
    loader_workers: int | None = opt("--loader-workers", type=click.IntRange(min=0),
                                     help="ImageNet-style data: decoding processes per training process  [default: 4]")
    decode_on: str | None = opt(
        "--decode-on", type=click.Choice(["workers", "device"]),
        help="ImageNet-style data: decode the training JPEGs in the workers, or on the run's device (nvJPEG on CUDA; "
             "the workers only read)  [default: workers]")

    def resolved(self, preset: str) -> "DataOptions":
        """With the preset's data set where none was given."""
        from dataclasses import replace

        from bench.specs import PRESETS

        return replace(self, dataset=self.dataset or PRESETS[preset].get("dataset", "cifar10"))

    def check(self) -> None:
        """Find and decode the data set before anything is written (and warm the cache for workers)."""
        from bench import data

        data.check(self.dataset, self.data_root, self.download)


@dataclass(frozen=True)
class ExecutionOptions(Group):
    heading: ClassVar[str] = "Execution"
    device: str = opt("--device", default="auto", help="auto, cpu or cuda[:N].")
    amp: bool | None = opt("--amp/--no-amp",
                           help="bf16 autocast  [default: on for CUDA and for CPUs with native bf16 (AVX512-BF16, AMX)]")
    channels_last: bool | None = opt("--channels-last/--no-channels-last", help="NHWC memory format  [default: on]")
    execution: str | None = opt(
        "--execution", type=click.Choice(["eager", "compile", "cudagraph"]),
        help="eager, torch.compile, or one CUDA graph per training step  [default: cudagraph on CUDA, eager on the CPU]")
    tensorboard: bool | None = opt(
        "--tensorboard/--no-tensorboard",
        help="Write each run's losses, errors, lr and img/s at every evaluation point to OUT/tb/<run_id> "
             "(`tensorboard --logdir OUT/tb` shows a sweep live; needs `pip install tensorboard`)  [default: off]")

    def overrides(self, data: DataOptions, pad_input: str | None = None) -> dict:
        """The execution options given (None: the device's default), as Execution fields."""
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise click.UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
        return dict(execution=self.execution, amp=self.amp, channels_last=self.channels_last,
                    pad_input=None if pad_input is None else int(pad_input), loader_workers=data.loader_workers,
                    decode_on=data.decode_on, tensorboard=self.tensorboard)


@dataclass(frozen=True)
class RunParallel(Group):
    heading: ClassVar[str] = "Execution"
    sync_bn: bool = opt("--sync-bn/--no-sync-bn", default=False,
                        help="Under torchrun or srun (data-parallel): BatchNorm over the whole batch (CUDA only).")


@dataclass(frozen=True)
class Parallelism(Group):
    heading: ClassVar[str] = "Parallelism (runs side by side, or one run over several processes)"
    jobs: int | None = opt("--jobs", type=COUNT,
                           help="CPU: runs at a time, in N processes of cores/N threads, each training one run after "
                                "another  [default: one per core, up to the runs to train; RESBENCH_JOBS sets it]")
    runs_per_gpu: int = opt("--runs-per-gpu", type=COUNT, default=1, help="CUDA: runs packed onto each GPU at a time.")
    fuse: Fuse = opt("--fuse", type=FuseType(), default="auto", show_default=True, metavar="auto|off|K",
                     help="Train runs of one shape as one grouped network (fused training). " + FUSE_HELP + ".")
    pad_input: str | None = opt(
        "--pad-input", type=click.Choice(["0", "4", "8"]),
        help="Run groups: zero-pad each member's input to 4 or 8 channels for cuDNN's NHWC kernels (0: off)  "
             "[default: 0]")
    gpus_per_run: int = opt(
        "--gpus-per-run", type=click.IntRange(min=0), default=1,
        help="GPUs per run: above 1, each run trains data-parallel over that many GPUs (one process each; locally "
             "and under Slurm, with --nodes). Slurm: 0 for CPU nodes.")
    procs_per_run: int = opt(
        "--procs-per-run", type=COUNT, default=1,
        help="Without GPUs: data-parallel processes per run (gloo; locally they share the cores, under Slurm they "
             "are tasks).")
    nodes: int = opt("--nodes", type=COUNT, default=1, help="Slurm: nodes a data-parallel run spans.")
    sync_bn: bool = opt(
        "--sync-bn/--no-sync-bn", default=False,
        help="A data-parallel run's BatchNorm over the whole batch (CUDA only); else over each process's share, as "
             "in the paper's 8-GPU runs (recorded as bn_batch, part of the run's identity).")


@dataclass(frozen=True)
class Cluster(Group):
    heading: ClassVar[str] = "Slurm (--executor slurm)"
    executor: str = opt("--executor", type=click.Choice(["local", "slurm"]), default="local")
    partition: str | None = opt("--partition", help="Slurm: partition.")
    time_min: int = opt("--time", type=COUNT, default=240, help="Slurm: time limit per task, minutes.")
    max_parallel: int = opt("--max-parallel", type=COUNT, default=16, help="Slurm: array tasks running at once.")
    cpus_per_task: int | None = opt(
        "--cpus-per-task", type=COUNT,
        help="Slurm: cores per task  [default: 1 + --loader-workers for ImageNet-style data, else 1]")
    mem_gb: int | None = opt(
        "--mem-gb", type=COUNT,
        help="Slurm: memory per task, GB  [default: 8, plus 2 per loader worker for ImageNet-style data]")
    slurm_opt: tuple[str, ...] = opt(
        "--slurm-opt", multiple=True, default=(), metavar="KEY=VALUE",
        help="Slurm: passed through to sbatch, e.g. account=abc, qos=high, constraint=h100 (repeatable).")
    wait: bool = opt("--wait/--no-wait", default=True,
                     help="Slurm: follow the jobs until done, or return after submitting.")
    dry_run: bool = opt("--dry-run", is_flag=True, default=False,
                        help="Slurm: print the job array (resources per task, one line per task) and submit nothing.")

    def extra(self) -> dict:
        """--slurm-opt KEY=VALUE pairs as a dict."""
        out = {}
        for pair in self.slurm_opt:
            key, sep, value = pair.partition("=")
            if not sep or not key.strip():
                raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--slurm-opt")
            out[key.strip()] = value.strip()
        return out


# -- resbench profile -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ProfileGrid(Group):
    heading: ClassVar[str] = "What to time"
    models: tuple[str, ...] | None = opt(
        "--nets", old="--models", callback=csv_list(str),
        help=f"Networks, by name (resnet20, plain56, ...)  [default: {profile_defaults('models')}]")
    batch_sizes: tuple[int, ...] | None = opt("--batch-sizes", callback=csv_list(int, minimum=1),
                                              help=f"[default: {profile_defaults('batch_sizes')}]")
    precisions: tuple[str, ...] | None = opt("--precisions", callback=csv_list(str),
                                             help=f"fp32, tf32, bf16  [default: {profile_defaults('precisions')}]")
    formats: tuple[str, ...] | None = opt("--formats", callback=csv_list(str),
                                          help=f"nchw, channels_last  [default: {profile_defaults('formats')}]")
    executions: tuple[str, ...] | None = opt(
        "--executions", callback=csv_list(str),
        help=f"eager, compile, cudagraph  [default: {profile_defaults('executions')}]")
    modes: tuple[str, ...] | None = opt("--modes", callback=csv_list(str), help="train, infer  [default: train,infer]")
    group_sizes: tuple[int, ...] | None = opt(
        "--group-sizes", callback=csv_list(int, minimum=1),
        help="Run groups of K nets trained as one grouped network (fused training; img/s is the group's aggregate)  "
             f"[default: {profile_defaults('group_sizes')}]")
    pad_inputs: tuple[int, ...] | None = opt(
        "--pad-input", old="--pad-inputs", callback=csv_list(int),
        help="Run groups: each member's input zero-padded to this many channels, 0 for none (e.g. 0,4,8)  "
             f"[default: {profile_defaults('pad_inputs')}]")
    image_size: int = opt("--image-size", type=COUNT, default=32,
                          help="Square input size; at 64 and more the ImageNet-style family gets its 7x7 stem (224: "
                               "ImageNet)")
    device: str = opt("--device", default="auto", help="auto, cpu or cuda[:N].")


@dataclass(frozen=True)
class ProfileTiming(Group):
    heading: ClassVar[str] = "How"
    repeats: int = opt("--repeats", type=COUNT, default=5, help="Timed blocks per configuration (median and spread).")
    warmup: int = opt("--warmup", type=click.IntRange(min=0), default=5, help="Untimed steps first.")
    block_s: float = opt("--block-s", type=POSITIVE, default=0.2, help="Target seconds per timed block.")


@dataclass(frozen=True)
class ProfileBaseline(Group):
    heading: ClassVar[str] = "The common pipeline against ours"
    baseline: bool = opt("--baseline/--no-baseline", default=True,
                         help="Also time the common DataLoader pipeline against ours.")
    baseline_model: str = opt("--baseline-model", default="resnet20")
    baseline_batch_size: int = opt("--baseline-batch-size", type=COUNT, default=128)
    workers: int | None = opt("--loader-workers", old="--workers", type=click.IntRange(min=0),
                              help=f"DataLoader workers of the baseline  [default: {profile_defaults('workers')}]")
    data_root: Path | None = opt(
        "--data-root", type=click.Path(path_type=Path),
        help="CIFAR-10 for the baseline  [default: $RESBENCH_DATA; synthetic if absent]")


@dataclass(frozen=True)
class ProfileDecode(Group):
    heading: ClassVar[str] = "The ImageNet-style input pipeline instead (--decode)"
    decode_tree: Path | None = opt(
        "--decode", type=click.Path(exists=True, path_type=Path), metavar="TREE",
        help="Instead of the grid: time the ImageNet-style input pipeline on an ImageFolder tree, on one core and "
             "with --loader-workers processes, and on a CUDA --device decoding there (nvJPEG); batch: the first of "
             "--batch-sizes (64 if not given)")
    decode_s: float = opt("--decode-s", type=POSITIVE, default=10.0, show_default=True,
                          help="With --decode: seconds each setting (one core, then the workers) decodes")
    decode_images: int = opt(
        "--decode-images", type=COUNT, default=5000, show_default=True,
        help="With --decode: training images of the tree, drawn at random, to time on (the rate depends on the "
             "images' sizes: time your own)")


@dataclass(frozen=True)
class ProfileOutput(Group):
    heading: ClassVar[str] = "Output"
    out: Path = opt("--out", type=click.Path(path_type=Path), default=Path("results/profile"))
    name: str | None = opt("--name", help="File name of the parquet  [default: from device and torch version]")
    against: Path | None = opt(
        "--against", type=click.Path(path_type=Path), metavar="PROFILE",
        help="A saved profile (.parquet, or a folder such as results/reference-profile-h200): write this machine / "
             "reference for every configuration both measured.")


SWEEP = (SweepGrid, Methods, RecipeOverrides, DataOptions, ExecutionOptions, Parallelism, Cluster)
RUN = (RunTarget, RecipeOverrides, DataOptions, ExecutionOptions, RunParallel)
PROFILE = (ProfileGrid, ProfileTiming, ProfileBaseline, ProfileDecode, ProfileOutput)
