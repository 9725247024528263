"""The resbench command line: a thin Click layer that parses, builds a spec and calls one function."""
from __future__ import annotations

import contextlib
import functools
import re
import signal
import sys
import tomllib
from pathlib import Path

import click

from bench.datasets import DATASETS
from bench.errors import DataError, Interrupted
from bench.progress import say
from bench.specs import FUSE_HELP, LESION_DRAWS, parse_fuse

CONTEXT = dict(help_option_names=["-h", "--help"], show_default=True, max_content_width=100)


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="resbench")
@click.option("--plugin", "plugins", multiple=True, metavar="MODULE",
              help="A module (import name or .py file) whose register(register) adds network families; "
                   "repeatable. Also RESBENCH_PLUGINS (comma-separated) and installed packages' "
                   "'resbench.networks' entry points.")
def main(plugins) -> None:
    """resbench: the degradation problem of He et al. 2015, on your hardware.

    \b
    Train plain and residual twins at several depths, record accuracy and
    throughput to parquet, and plot degradation curves:
      resbench sweep --preset smoke --data-root ~/data
      resbench report results/smoke
    """
    if plugins:  # through the environment, so worker processes and Slurm tasks load them too
        import os

        given = [m for m in os.environ.get("RESBENCH_PLUGINS", "").split(",") if m.strip()]
        os.environ["RESBENCH_PLUGINS"] = ",".join(dict.fromkeys(given + [str(Path(p).resolve()) if p.endswith(".py")
                                                                          else p for p in plugins]))


class Sectioned(click.Command):
    """A command whose --help lists its options under headings (``sections``: heading -> parameter names, in the
    order shown); options not named come last, under "Other options"."""

    sections: dict[str, list[str]] = {}

    def format_options(self, ctx, formatter):
        params = {p.name: p for p in self.get_params(ctx)}
        placed = set()
        for heading, names in [*self.sections.items(), ("Other options", [n for n in params if n not in
                                                                             {x for v in self.sections.values() for x in v}])]:
            rows = [r for n in names if n in params and n not in placed and (r := params[n].get_help_record(ctx))]
            placed |= set(names)
            if rows:
                with formatter.section(heading):
                    formatter.write_dl(rows)


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


def friendly_errors(fn):
    """Turn the library's expected errors into a one-line message and exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, DataError, PermissionError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper


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
    olds = {p.old.lstrip("-").replace("-", "_"): p.name for p in ctx.command.params if isinstance(p, Renamed)}
    conf = {olds.get(k, k): v for k, v in conf.items()}  # an earlier option name still works as a key
    known = {p.name for p in ctx.command.params}
    unknown = sorted(set(conf) - known)
    if unknown:
        raise click.BadParameter(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys are the options of "
                                 f"'resbench {ctx.info_name}' (see --help)")
    ctx.default_map = {**(ctx.default_map or {}), **conf}
    return path


def preset_defaults(field: str) -> str:
    """Each preset's value of a recipe or grid field, as help text: 'he2015 64000, quick 6400, smoke 400'."""
    from bench.specs import PRESETS, RECIPES

    def text(v):
        if v is None:
            return "all"
        if isinstance(v, tuple):
            return ",".join(map(str, v)) or "none"
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = {name: p[field] if field in p else getattr(RECIPES[p["recipe"]], field) for name, p in PRESETS.items()}
    if len({text(v) for v in values.values()}) == 1:  # every preset's: said once
        return text(next(iter(values.values())))
    return ", ".join(f"{name} {text(v)}" for name, v in values.items())


def profile_defaults(key: str) -> str:
    """What `resbench profile` measures when not told, per device, as help text."""
    from bench.profile_tables import DEFAULTS

    cpu, cuda = (",".join(map(str, DEFAULTS[d][key])) if isinstance(DEFAULTS[d][key], tuple) else str(DEFAULTS[d][key])
                 for d in ("cpu", "cuda"))
    return cpu if cpu == cuda else f"{cpu} on the CPU; {cuda} on CUDA"


RECIPE_OPTIONS = [  # (option, Recipe field, type, help): each overrides the preset's recipe when given
    ("--iterations", "iterations", COUNT, "Total optimizer steps (epochs where the preset's schedule counts epochs)."),
    ("--batch-size", "batch_size", COUNT, "Training batch size."),
    ("--lr", "lr", POSITIVE, "Base learning rate."),
    ("--milestones", "milestones", str, "Steps (or epochs) at which lr is divided by 10, e.g. 32000,48000 ('' for "
                                        "none)."),
    ("--schedule", "schedule", click.Choice(["step", "cosine"]), "The lr schedule: step (/10 at each milestone, the "
                                                                  "paper's) or cosine (to 0 at the last step)."),
    ("--momentum", "momentum", click.FloatRange(0, 1, max_open=True), "SGD momentum."),
    ("--weight-decay", "weight_decay", click.FloatRange(min=0), "L2 weight decay (on every parameter unless "
                                                                 "--no-decay-1d)."),
    ("--warmup", "warmup_iters", click.IntRange(min=0), "Steps at --warmup-lr first, for nets of --warmup-min-depth "
                                                        "layers or more (0: none)."),
    ("--warmup-lr", "warmup_lr", POSITIVE, "The warm-up's learning rate."),
    ("--warmup-min-depth", "warmup_min_depth", COUNT, "Nets at least this deep warm up."),
    ("--normalize", "normalize", click.Choice(["pixel-mean", "standardize", "pln"]),
     "Input: pixel-mean (He et al.: minus the per-pixel mean image), standardize (per channel to unit variance), "
     "pln (standardize, then dks's per-location normalisation: one input channel more)."),
    ("--mixup", "mixup", click.FloatRange(min=0), "mixup's Beta(a, a) parameter a (0: off; Fixup's code: 1)."),
    ("--train-size", "train_size", COUNT, "Train on the first N images of the training split (the 50k training "
                                          "images less --val-size)."),
    ("--val-size", "val_size", click.IntRange(min=0), "Validation images held out of the training set (0: train on all)."),
    ("--test-size", "test_size", COUNT, "Evaluate on the first N test images."),
    ("--eval-every", "eval_every", COUNT, "Steps (or epochs) between evaluation points (curve rows and checkpoints)."),
]


RECIPE_FLAGS = ("decay_1d", "lighting")  # recipe fields set by on/off flags (recipe_options)
# Recipe fields no option sets: the recipe's name (the preset's), the decay factor (always /10 in the presets) and what
# a preset fixes for its data (ImageNet's 10-crop test, epochs as the schedule's unit)
RECIPE_FIXED = ("name", "lr_decay", "ten_crop", "schedule_in")


def recipe_options(fn):
    """Options that override fields of the preset's recipe (unset = the preset's value, stated in the help)."""
    fn = click.option("--decay-1d/--no-decay-1d", default=None,
                      help="Weight decay also on 1-D parameters (biases, BN's affine, per-channel scales); "
                           "--no-decay-1d as DiracNet's code  [default: on]")(fn)
    fn = click.option("--lighting/--no-lighting", default=None,
                      help="ImageNet-style data: Krizhevsky et al.'s colour augmentation (PCA lighting), the "
                           f"paper's 'standard color augmentation'  [default: {preset_defaults('lighting')}]")(fn)
    for name, field, typ, text in reversed(RECIPE_OPTIONS):
        fn = click.option(name, field, type=typ, default=None,
                          help=f"{text}  [default: {preset_defaults(field)}]")(fn)
    return fn


def exec_options(fn):
    for decorator in reversed([
        click.option("--data-root", type=click.Path(path_type=Path), default=None,
                     help="Folder or archive with the data set  [default: $RESBENCH_DATA]"),
        click.option("--download", is_flag=True, help="Fetch the data set with torchvision if not found."),
        click.option("--device", default="auto", help="auto, cpu or cuda[:N]."),
        click.option("--amp/--no-amp", default=None,
                     help="bf16 autocast  [default: on for CUDA and for CPUs with native bf16 (AVX512-BF16, AMX)]"),
        click.option("--channels-last/--no-channels-last", default=None, help="NHWC memory format  [default: on]"),
        click.option("--execution", type=click.Choice(["eager", "compile", "cudagraph"]), default=None,
                     help="eager, torch.compile, or one CUDA graph per training step  [default: cudagraph on CUDA, "
                          "eager on the CPU]"),
        click.option("--dataset", type=click.Choice(DATASETS), default=None,
                     help="[default: the preset's: cifar10, imagenet for he2015-imagenet, imagenette for imagenette]"),
        click.option("--loader-workers", type=click.IntRange(min=0), default=None,
                     help="ImageNet-style data: decoding processes per training process  [default: 4]"),
        click.option("--decode-on", type=click.Choice(["workers", "device"]), default=None,
                     help="ImageNet-style data: decode the training JPEGs in the workers, or on the run's device "
                          "(nvJPEG on CUDA; the workers only read)  [default: workers]"),
        click.option("--tensorboard/--no-tensorboard", default=None,
                     help="Write each run's losses, errors, lr and img/s at every evaluation point to OUT/tb/<run_id> "
                          "(`tensorboard --logdir OUT/tb` shows a sweep live; needs `pip install tensorboard`)  "
                          "[default: off]"),
        click.option("--width", type=POSITIVE, default=None,
                     help=f"Channel multiplier  [default: {preset_defaults('width')}]"),
        click.option("--shortcut", type=click.Choice(["A", "B", "C"], case_sensitive=False), default="A"),
    ]):
        fn = decorator(fn)
    return fn


def _recipe(preset: str, o: dict):
    from bench.specs import PRESETS, recipe

    given = {field: o[field] for _, field, _, _ in RECIPE_OPTIONS} | {f: o[f] for f in RECIPE_FLAGS}
    if given["milestones"] is not None:
        given["milestones"] = csv_list(int)(None, None, given["milestones"]) or ()
    return recipe(PRESETS[preset]["recipe"], **given)


def _execution(o: dict):
    from bench.specs import Execution

    return Execution.for_device(o["device"], **_exec_overrides(o))


def _exec_overrides(o: dict) -> dict:
    """The execution options given (None: the device's default), as Execution fields."""
    if o.get("tensorboard"):
        import importlib.util

        if importlib.util.find_spec("tensorboard") is None:
            raise click.UsageError("--tensorboard needs the tensorboard package: pip install tensorboard")
    return dict(execution=o["execution"], amp=o["amp"], channels_last=o["channels_last"],
                pad_input=None if o.get("pad_input") is None else int(o["pad_input"]), loader_workers=o["loader_workers"],
                decode_on=o["decode_on"], tensorboard=o.get("tensorboard"))


def _presets() -> list[str]:
    from bench.specs import PRESETS

    return list(PRESETS)


PRESET = click.option("--preset", type=click.Choice(_presets()), default="smoke",
                      help="Recipe and grid defaults (see README).")


@main.command(cls=Sectioned)
@click.argument("model")
@PRESET
@click.option("--seed", type=click.IntRange(min=0), default=0)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: results/<preset>]")
@click.option("--sync-bn/--no-sync-bn", default=False,
              help="Under torchrun or srun (data-parallel): BatchNorm over the whole batch (CUDA only).")
@recipe_options
@exec_options
@friendly_errors
def run(model, preset, seed, out, sync_bn, **o):
    """Train one network and record it (resumes an interrupted run of the same spec).

    Started by torchrun or srun (WORLD_SIZE > 1 in the environment they set), each process is one rank of a
    data-parallel run: the same run, and the same records, as `resbench sweep --procs-per-run N` (or
    --gpus-per-run N) trains, which resumes it and is resumed by it.

    \b
    Examples:
      resbench run plain20 --preset smoke --seed 1 --data-root ~/data
      torchrun --nproc-per-node 8 -m bench run resnet18 --preset he2015-imagenet --data-root /data/imagenet
    """
    from bench import ddp
    from bench.specs import PRESETS, RunSpec
    from bench.sweep import check_writable, run_local

    o["dataset"] = _dataset(preset, o)
    recipe = _recipe(preset, o)
    world = ddp.place().world  # torchrun's or srun's processes: one run over them
    from bench.specs import Execution

    ex = Execution.for_device(o["device"], **_exec_overrides(o), world_size=world, sync_bn=sync_bn)
    spec = RunSpec(model=model, recipe=recipe, seed=seed, dataset=o["dataset"],
                   width=o["width"] if o["width"] is not None else PRESETS[preset]["width"],
                   shortcut=o["shortcut"].upper(), sweep=preset,
                   bn_batch=recipe.batch_size // world if world > 1 and not sync_bn else None)
    out = out or Path("results") / preset
    _require_data(o)
    check_writable(out)
    place = ddp.init(ex.device.startswith("cuda"))
    with _stoppable():
        run_local([spec], out, ex, data_root=o["data_root"], download=o["download"], progress=True,
                  log=say if place.main else lambda line: None)
    ddp.leave()
    if place.main:
        _fail_if_failed([spec], out)


@contextlib.contextmanager
def _stoppable():
    """Training from the command line: Ctrl-C and SIGTERM (a scheduler's preemption, `kill`) stop it cleanly, saying
    where it stood and how to resume (exit 130 and 143, as shells count signals); a hung-up terminal (SIGHUP,
    a dropped SSH connection) does not stop it, and a console that went away is not written to again
    (bench.progress.say): the training goes on recording to its folder."""
    stopped = {}

    def terminate(signum, _frame):
        stopped["by"] = signum
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig, handler in
                ((signal.SIGTERM, terminate), (signal.SIGHUP, signal.SIG_IGN))}
    try:
        yield
    except KeyboardInterrupt as e:
        where = f" at step {e.step} of {e.total} ({e.what})" if isinstance(e, Interrupted) else ""
        say(f"interrupted{where}; rerun the same command to resume (each run continues from its last checkpoint)",
            err=True)
        sys.exit(143 if stopped.get("by") == signal.SIGTERM else 130)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _dataset(preset: str, o: dict) -> str:
    from bench.specs import PRESETS

    return o["dataset"] or PRESETS[preset].get("dataset", "cifar10")


def _require_data(o: dict) -> None:
    """Find and decode the data set before anything is written (and warm the cache for workers)."""
    from bench import data

    data.check(o["dataset"], o["data_root"], o["download"])


def _fail_if_failed(runs, out: Path) -> None:
    from bench.records import finished

    status = finished(out)
    failed = [r.run_id for r in runs if status.get(r.run_id) == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed (their error is in the records; "
                                   f"`resbench status {out}` lists them): {', '.join(failed)}")


def _lr_for(_ctx, _param, value):
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


def _lr_grid_for(_ctx, _param, value):
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
    if value is None or str(value).strip() == "preset":
        return None if value is None else ("preset",)
    return csv_list(float)(None, None, value)


def _grids_help() -> str:
    from bench.specs import LR_GRIDS

    return "; ".join(f"{k} {min(g):g}..{max(g):g}, {len(g)} values x2 apart" for k, g in LR_GRIDS.items())


def _fuse_option(ctx, param, value):
    try:
        parse_fuse(value)
    except ValueError as e:
        raise click.BadParameter(str(e).removeprefix("--fuse ")) from None
    return value


@main.command(cls=Sectioned)
@click.option("--config", type=click.Path(dir_okay=False), callback=load_config, is_eager=True, expose_value=False,
              help="TOML file of option values (keys as option names); explicit options win.")
@PRESET
@renamed("--kinds", "--models", "kinds", callback=csv_list(str), default=None,
         help="Network kinds: resnet, plain (He et al.), preresnet, preplain (He et al. 2016), the methods (highway, "
              "fixup, skipinit, rezero, dirac, tat) and plugins' (`resbench models --kinds all` lists them)  "
              f"[default: {preset_defaults('models')}]")
@click.option("--depths", callback=csv_list(int), default=None,
              help=f"Depths: 6n+2 (8, 20, 32, ...: the CIFAR family) on CIFAR-like data; 18, 34, 50, 101, 152 (the "
                   f"ImageNet-style family) on ImageNet-style data  [default: {preset_defaults('depths')}]")
@click.option("--seeds", callback=csv_list(int, minimum=0, example="0,1,2 or 0-4", ranges=True), default=None,
              help=f"Seeds, one run of each net per seed: 0,1,2 or 0-4  [default: {preset_defaults('seeds')}]")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="[default: results/<preset>]")
@click.option("--name", default=None, help="Sweep name in the records  [default: the preset]")
@click.option("--lr-for", callback=_lr_for, default=None, metavar="KIND=LR,...",
              help="Kinds trained at their own lr, e.g. fixup=0.1,tat=0.005 (the others at --lr); in the run_id.")
@click.option("--lr-grid", callback=_lr_grid, default=None, metavar="LR,...|preset",
              help="Tune the lr: for each kind and depth, train every lr on the grid seeds, then the one with the "
                   "lowest validation error on the other seeds; a choice at an edge widens the grid x2 (at most twice "
                   "a side) ('preset': " + _grids_help() + ").")
@click.option("--grid-seeds", type=COUNT, default=1, show_default=True,
              help="A tuned sweep: how many of the first --seeds train the lr grid; the results are the other seeds "
                   "(never a seed that took part in the choice).")
@click.option("--lr-grid-widen", type=click.IntRange(min=0), default=2, show_default=True,
              help="A tuned sweep: factor-2 steps a cell's grid may grow at an end where its choice sits (0: never).")
@click.option("--lr-grid-for", callback=_lr_grid_for, default=None, metavar="KIND=LR:LR:...,...",
              help="Kinds tuned on a grid of their own, e.g. tat=0.0005:0.001:0.002 (the others on --lr-grid).")
@click.option("--weight-decay-for", callback=_lr_for, default=None, metavar="KIND=WD,...",
              help="Kinds trained with their own weight decay, e.g. tat=0,fixup=5e-4 (the others at --weight-decay); "
                   "in the run_id.")
@click.option("--method-recipe", type=click.Choice(["matched", "paper"]), default="matched",
              help="matched: every kind on the one recipe; paper: each method with its own paper's settings where "
                   "they differ (fixup: standardized input and mixup; dirac: no decay on 1-D parameters; tat: "
                   "per-location normalisation).")
@click.option("--executor", type=click.Choice(["local", "slurm"]), default="local")
@click.option("--jobs", type=COUNT, default=None,
              help="CPU: runs at a time, in N processes of cores/N threads, each training one run after another  "
                   "[default: one per core, up to the runs to train; RESBENCH_JOBS sets it]")
@click.option("--runs-per-gpu", type=COUNT, default=1, help="CUDA: runs packed onto each GPU at a time.")
@click.option("--pad-input", type=click.Choice(["0", "4", "8"]), default=None,
              help="Run groups: zero-pad each member's input to 4 or 8 channels for cuDNN's NHWC kernels "
                   "(0: off)  [default: 0]")
@click.option("--fuse", default="auto", show_default=True, callback=_fuse_option, metavar="auto|off|K",
              help="Train runs of one shape as one grouped network (fused training). " + FUSE_HELP + ".")
@recipe_options
@exec_options
@friendly_errors
@click.option("--partition", default=None, help="Slurm: partition.")
@click.option("--gpus-per-run", type=click.IntRange(min=0), default=1,
              help="GPUs per run: above 1, each run trains data-parallel over that many GPUs (one process each; "
                   "locally and under Slurm, with --nodes). Slurm: 0 for CPU nodes.")
@click.option("--procs-per-run", type=COUNT, default=1,
              help="Without GPUs: data-parallel processes per run (gloo; locally they share the cores, under "
                   "Slurm they are tasks).")
@click.option("--nodes", type=COUNT, default=1, help="Slurm: nodes a data-parallel run spans.")
@click.option("--sync-bn/--no-sync-bn", default=False,
              help="A data-parallel run's BatchNorm over the whole batch (CUDA only); else over each process's "
                   "share, as in the paper's 8-GPU runs (recorded as bn_batch, part of the run's identity).")
@click.option("--time", "time_min", type=COUNT, default=240, help="Slurm: time limit per task, minutes.")
@click.option("--max-parallel", type=COUNT, default=16, help="Slurm: array tasks running at once.")
@click.option("--slurm-opt", multiple=True, metavar="KEY=VALUE",
              help="Slurm: passed through to sbatch, e.g. account=abc, qos=high, constraint=h100 (repeatable).")
@click.option("--wait/--no-wait", default=True, help="Slurm: follow the jobs until done, or return after submitting.")
@click.option("--cpus-per-task", type=COUNT, default=None,
              help="Slurm: cores per task  [default: 1 + --loader-workers for ImageNet-style data, else 1]")
@click.option("--mem-gb", type=COUNT, default=None,
              help="Slurm: memory per task, GB  [default: 8, plus 2 per loader worker for ImageNet-style data]")
@click.option("--dry-run", is_flag=True,
              help="Slurm: print the job array (resources per task, one line per task) and submit nothing.")
def sweep(preset, kinds, depths, seeds, out, name, lr_for, lr_grid, grid_seeds, lr_grid_widen, lr_grid_for, weight_decay_for,
          method_recipe, executor, jobs, runs_per_gpu, fuse,
          partition, gpus_per_run, procs_per_run, nodes, sync_bn, time_min, max_parallel, slurm_opt, wait,
          cpus_per_task, mem_gb, dry_run, **o):
    """Train the grid kinds x depths x seeds; rerun the same command to resume.

    Finished runs are skipped, an interrupted run continues from its checkpoint.

    \b
    Examples:
      resbench sweep --preset smoke
      resbench sweep --preset he2015 --depths 20,56,110 --seeds 0,1,2 --device cuda
      resbench sweep --preset he2015 --seeds 0,1,2,3,4 --fuse 10   # 5 seeds x twins: one group per depth
      resbench sweep --config my-sweep.toml --seeds 3
      resbench sweep --preset smoke --kinds plain,resnet,fixup,tat --seeds 0,1,2 --lr-grid preset
    """
    from bench import launch as lch
    from bench import sweep as sw
    from bench.slurm import resources
    from bench.specs import LR_GRIDS, PRESETS, SweepSpec

    p = PRESETS[preset]
    o["dataset"] = _dataset(preset, o)
    recipe = _recipe(preset, o)
    if dry_run and executor != "slurm":
        raise click.UsageError("--dry-run shows a Slurm job array: use it with --executor slurm")
    auto = resources(o["dataset"], o["loader_workers"] if o["loader_workers"] is not None else 4)
    try:
        launch = lch.Launch.build(
            executor=executor, device=o["device"], overrides=_exec_overrides(o), fuse=fuse, gpus_per_run=gpus_per_run,
            procs_per_run=procs_per_run, nodes=nodes, sync_bn=sync_bn, batch_size=recipe.batch_size, jobs=jobs,
            runs_per_gpu=runs_per_gpu, wait=wait,
            slurm=dict(partition=partition, time_min=time_min, max_parallel=max_parallel, extra=_key_values(slurm_opt),
                       cpus_per_task=cpus_per_task or auto["cpus_per_task"], mem_gb=mem_gb or auto["mem_gb"]))
    except ValueError as e:  # options that do not go together: a usage error, before anything runs
        raise click.UsageError(str(e)) from None
    if lr_grid == ("preset",):
        if preset not in LR_GRIDS:
            raise click.BadParameter(f"preset {preset} has no lr grid; give the lrs, e.g. 0.025,0.05,0.1,0.2",
                                     param_hint="--lr-grid")
        lr_grid = LR_GRIDS[preset]
    spec = SweepSpec(name=name or preset, recipe=recipe, models=kinds or p["models"],
                     depths=depths or p["depths"], seeds=seeds if seeds is not None else p["seeds"],
                     width=o["width"] if o["width"] is not None else p["width"], shortcut=o["shortcut"].upper(),
                     dataset=o["dataset"], bn_batch=launch.bn_batch(recipe.batch_size), lr_for=lr_for or (),
                     lr_grid=lr_grid or (), method_recipe=method_recipe, grid_seeds=grid_seeds, grid_widen=lr_grid_widen,
                     lr_grid_for=lr_grid_for or (), weight_decay_for=weight_decay_for or ())
    runs = spec.runs()  # validates every model name before anything is written
    if dry_run:  # what would go to Slurm: no data, folder or sbatch needed
        for line in lch.dry_run(runs, launch):
            click.echo(line)
        return
    out = out or Path("results") / spec.name
    _require_data(o)
    sw.check_writable(out)
    with _stoppable():
        runs = lch.execute(spec, out, launch, data_root=o["data_root"], download=o["download"], log=say)
    if launch.executor == "local" or launch.wait:
        say(sw.summary(runs, out).to_string(index=False, na_rep="-"))
    if launch.executor == "local":
        _fail_if_failed(runs, out)


# the recipe's options as help lists them: RECIPE_OPTIONS in order, then the two on/off flags (declared once, there)
RECIPE_SECTION = [field for _, field, _, _ in RECIPE_OPTIONS] + list(RECIPE_FLAGS)
DATA_SECTION = ["dataset", "data_root", "download", "loader_workers", "decode_on"]
EXECUTION_SECTION = ["device", "amp", "channels_last", "execution", "tensorboard"]
sweep.sections = {
    "What to train": ["config", "preset", "kinds", "depths", "seeds", "width", "shortcut", "out", "name"],
    "Methods compared": ["lr_for", "lr_grid", "grid_seeds", "lr_grid_widen", "lr_grid_for", "weight_decay_for",
                         "method_recipe"],
    "Recipe (overrides the preset's)": RECIPE_SECTION,
    "Data": DATA_SECTION,
    "Execution": EXECUTION_SECTION,
    "Parallelism (runs side by side, or one run over several processes)": [
        "jobs", "runs_per_gpu", "fuse", "pad_input", "gpus_per_run", "procs_per_run", "nodes", "sync_bn"],
    "Slurm (--executor slurm)": ["executor", "partition", "time_min", "max_parallel", "cpus_per_task", "mem_gb",
                                 "slurm_opt", "wait", "dry_run"],
}
run.sections = {"What to train": ["preset", "seed", "width", "shortcut", "out"], "Recipe (overrides the preset's)":
                RECIPE_SECTION, "Data": DATA_SECTION, "Execution": EXECUTION_SECTION + ["sync_bn"]}


def _key_values(pairs) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--slurm-opt")
        out[key.strip()] = value.strip()
    return out


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--follow", is_flag=True, help="Keep watching: the running runs' last points, until none is left.")
@click.option("--every", type=POSITIVE, default=10.0, show_default=True, help="--follow: seconds between looks.")
@friendly_errors
def status(results_dir, follow, every):
    """Counts of done / running / pending / failed / diverged runs, with Slurm job ids; with --follow, the
    running runs' last evaluation points, again every few seconds until nothing is running or pending.

    \b
    Examples:
      resbench status results/he2015
      resbench status results/smoke --follow
    """
    import time

    from bench.sweep import live_points, status as sweep_status

    while True:
        table = sweep_status(results_dir)
        counts = table["status"].value_counts()
        say(", ".join(f"{k}: {int(counts.get(k, 0))}" for k in
                      ("ok", "running", "retrying", "pending", "interrupted", "failed", "diverged")) + f" (of {len(table)})")
        if not follow and len(table):
            shown = table.drop(columns=[c for c in ("held_by", "slurm_job", "slurm_state", "error") if table[c].isna().all()])
            say(shown.to_string(index=False, na_rep="-"))
        for line in live_points(results_dir, table) if follow else ():
            say("  " + line)
        if not follow or not counts.get("running", 0) + counts.get("retrying", 0) + counts.get("pending", 0):
            return
        time.sleep(every)


@main.command()
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--keep/--remove", default=False, show_default=True,
              help="Keep the per-run files packed (other tools then read those runs twice; resbench reads each once).")
@friendly_errors
def pack(results_dir, keep):
    """Pack a results folder: each table's finished runs into one file (runs/packed.parquet, curves/..., layers/,
    signals/); a failed run keeps its own file (the next sweep retries it). Sweeps, report, status and
    diagnose read packed and unpacked folders alike; rerun to pack what was recorded since.

    \b
    Example:
      resbench pack results/smoke
    """
    from bench.records import pack as pack_folder

    if not any((results_dir / d).is_dir() for d in ("runs", "profile", "analysis")):
        raise click.ClickException(f"{results_dir} has no runs/, profile/ or analysis/: not a results folder (what "
                                   f"`resbench sweep --out` or `resbench profile --out` writes)")
    counts = pack_folder(results_dir, keep=keep)
    per_run = any(name in counts for name in ("runs", "curves", "layers", "signals"))
    click.echo((", ".join(f"{name}: {n} rows" for name, n in counts.items()) or "nothing to pack")
               + f" in {results_dir}" + ("" if keep or not per_run else " (the per-run files packed are removed)"))


@main.command("check-data")
@click.argument("folder", type=click.Path(exists=True, path_type=Path))
@renamed("--loader-workers", "--workers", "workers", type=click.IntRange(min=0), default=4, help="Decoding processes.")
@friendly_errors
def check_data(folder, workers):
    """Decode every image of an ImageNet-style tree once and list those that cannot be read.

    FOLDER: a folder (or .tar) with train/<class>/ and val/<class>/, as --data-root takes it. Exit code 1
    if any file is bad: a run would stop at the first one (in whichever process of a data-parallel run
    reads it), so check a new copy of ImageNet before a long sweep.

    \b
    Example:
      resbench check-data /data/imagenet --loader-workers 16
    """
    from bench import imagefolder

    tree = imagefolder.scan(folder)
    bad = imagefolder.check_files(tree, workers=workers, progress=sys.stderr.isatty())
    for path, why in bad:
        click.echo(f"{path}: {why}")
    n = len(tree.train) + len(tree.val)
    if bad:
        raise click.ClickException(f"{len(bad)} of {n} images cannot be decoded (listed above): remove or replace them")
    click.echo(f"all {n} images of {tree.root} decode ({len(tree.train)} train/, {len(tree.val)} val/)")


@main.command(hidden=True)
@click.argument("spec_file", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
def worker(spec_file, out):
    """Run one spec written by the sweep (internal)."""
    from bench.sweep import worker as run_worker

    sys.exit(run_worker(spec_file, out))


@main.command(hidden=True)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def serve(out):
    """Train the groups whose spec files a parallel sweep names on stdin, one after another (internal)."""
    from bench.sweep import serve as serve_groups

    sys.exit(serve_groups(out))


@main.command()
@click.option("--depths", callback=csv_list(int), default="20,32,44,56,110", help="CIFAR depths (6n+2).")
@click.option("--kinds", callback=csv_list(str), default="plain,resnet",
              help="Kinds to count ('all': every kind listed at the top)")
@click.option("--width", type=POSITIVE, default=1.0, help="Channel multiplier.")
@click.option("--imagenet/--no-imagenet", default=True, help="Also list resnet18..152.")
@friendly_errors
def models(depths, kinds, width, imagenet):
    """List the network kinds (He et al.'s, the degradation fixes, plugins), then parameters and
    multiply-adds (32x32 input) of the asked kinds at the asked depths.

    \b
    Examples:
      resbench models --depths 20,32,44,56,110,1202
      resbench models --kinds all --depths 20,56 --no-imagenet
    """
    import resnet
    from bench.specs import model_name

    click.echo(f"{'kind':<11}{'shortcut':<10}{'norm':<6}source")
    for kind in resnet.kinds():
        m = resnet.method(kind)
        source = m.paper + (f" [plugin {m.package}=={m.version}]" if m.package else "")
        click.echo(f"{kind:<11}{'yes' if m.residual else 'no':<10}{m.normalization:<6}{source}")
    for what, why in resnet.PLUGIN_ERRORS.items():
        click.echo(f"plugin {what} failed to load: {why}", err=True)
    click.echo("")
    kinds = resnet.kinds() if kinds == ("all",) else kinds
    # a depth names its family: 6n+2 the CIFAR one, 18, 34, 101 the ImageNet-style one (50, 152: --imagenet)
    names = [model_name(k, d, "cifar" if d >= 8 and (d - 2) % 6 == 0 else "imagenet") for d in depths for k in kinds]
    if imagenet:
        names += [f"resnet{d}" for d in resnet.IMAGENET_DEPTHS]
    nets = {name: resnet.build(name, width=width) for name in names}
    click.echo(f"{'model':<16}{'family':<10}{'params':>12}{'MACs':>14}")
    for name, net in nets.items():
        family = resnet.parse(name).family
        params, macs = resnet.count_params(net), resnet.count_macs(net)
        click.echo(f"{name:<16}{family:<10}{params / 1e6:>11.3f}M{macs / 1e6:>13.1f}M")


@main.command()
@click.argument("results_dirs", metavar="RESULTS_DIR...", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="[default: RESULTS_DIR/report; required with several folders]")
@click.option("--compare-by", default=None, metavar="COLUMN",
              help="Run column whose values the figures tell apart, e.g. gpu_name, shortcut, amp, recipe, width  "
                   "[default with several folders: sweep]")
@click.option("--format", "fmt", type=click.Choice(["png", "svg", "pdf"]), default="png")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, hidden=True,
              help="Not needed any more (Figure 7 comes from `resbench diagnose`); accepted for a release.")
@click.option("--responses/--no-responses", default=True,
              help="Draw Figure 7 (from the layer responses `resbench diagnose` measured).")
@friendly_errors
def report(results_dirs, out, compare_by, fmt, data_root, responses):
    """Figures, the Table 6 comparison, report.md and report.html from one or more results folders
    (their records only: no data set, no weights; Figure 7 and the diagnostics come from `resbench diagnose`).

    With several folders (or --compare-by), their runs go into one report: each figure draws one
    facet or line style per value of the compared column, the Table 6 comparison one column per
    value, and the report says at the top which other settings differ.

    \b
    Examples:
      resbench report results/smoke --format svg
      resbench report results/smoke-A results/smoke-B --compare-by shortcut --out results/A-vs-B
    """
    from bench.report import ReportError, build_report

    if len(results_dirs) > 1 and out is None:
        raise click.UsageError("several results folders need --out (where the joint report goes)")
    try:
        rep = build_report(list(results_dirs), out, fmt, responses=responses, compare_by=compare_by)
    except ReportError as e:
        raise click.ClickException(str(e)) from None
    for note in rep.warnings + rep.notes:
        click.echo(f"{'warning' if note in rep.warnings else 'note'}: {note}", err=True)
    for path in rep.files:
        click.echo(str(path))


@main.command()
@click.argument("results_dir", type=click.Path(path_type=Path))
@click.option("--data-root", type=click.Path(path_type=Path), default=None,
              help="Data set  [default: the runs' recorded data_source, else $RESBENCH_DATA]")
@click.option("--responses/--no-responses", default=True,
              help="The std of each 3x3 conv's response on the test set (He et al. Fig. 7).")
@click.option("--lesion/--no-lesion", default=True, help="Test error with blocks deleted (Veit et al. 2016).")
@click.option("--shattered/--no-shattered", default=True,
              help="Correlation of input gradients against distance along a line through test images, at "
                   "initialisation and trained (Balduzzi et al. 2017).")
@click.option("--max-images", type=COUNT, default=None, help="Test images for the lesion study  [default: all; 1000 of an ImageNet-style val/]")
@click.option("--draws", type=COUNT, default=LESION_DRAWS,
              help="Random sets of k deleted blocks per k (seeded by the run's seed and k).")
@click.option("--shattered-images", type=COUNT, default=8, show_default=True,
              help="Test images whose input gradients the shattered-gradient measure follows (its time grows with "
                   "them, not with --max-images).")
@friendly_errors
def diagnose(results_dir, data_root, responses, lesion, shattered, max_images, draws, shattered_images):
    """What the saved weights show: layer responses (Fig. 7), lesions and shattered gradients.

    Writes RESULTS_DIR/analysis/responses.parquet, lesion.parquet and shattered.parquet; `resbench report`
    draws them.
    Needs the runs' weights (RESULTS_DIR/weights/, written by the sweep; the committed references
    keep none). Runs on the CPU, in bf16 where the CPU has native bf16. Interrupted, the same
    command resumes from the runs it finished (kept in RESULTS_DIR/analysis/parts/ until the end).

    \b
    Example:
      resbench diagnose results/smoke && resbench report results/smoke
    """
    from bench import records
    from bench.analysis import diagnose as run_diagnose

    if not (Path(results_dir) / "runs").is_dir():
        raise click.ClickException(f"{results_dir} is not a results folder (no runs/); give a folder that "
                                   f"`resbench sweep --out` wrote")
    runs, _ = records.load(results_dir)
    notes: list = []
    out = run_diagnose(results_dir, runs, data_root=data_root, responses=responses, lesion=lesion, shattered_=shattered,
                       max_images=max_images, draws=draws, images=shattered_images, progress=True, notes=notes,
                       log=lambda line: click.echo(line, err=True))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if not out:
        raise click.ClickException(f"nothing to diagnose in {results_dir}: no finished run with saved weights")
    for name, df in out.items():
        click.echo(f"{Path(results_dir) / 'analysis' / (name + '.parquet')}: {len(df)} rows")


@main.command(cls=Sectioned)
@renamed("--nets", "--models", "models", callback=csv_list(str), default=None,
         help=f"Networks, by name (resnet20, plain56, ...)  [default: {profile_defaults('models')}]")
@click.option("--batch-sizes", callback=csv_list(int, minimum=1), default=None,
              help=f"[default: {profile_defaults('batch_sizes')}]")
@click.option("--precisions", callback=csv_list(str), default=None,
              help=f"fp32, tf32, bf16  [default: {profile_defaults('precisions')}]")
@click.option("--formats", callback=csv_list(str), default=None,
              help=f"nchw, channels_last  [default: {profile_defaults('formats')}]")
@click.option("--executions", callback=csv_list(str), default=None,
              help=f"eager, compile, cudagraph  [default: {profile_defaults('executions')}]")
@click.option("--modes", callback=csv_list(str), default=None, help="train, infer  [default: train,infer]")
@click.option("--group-sizes", callback=csv_list(int, minimum=1), default=None,
              help="Run groups of K nets trained as one grouped network (fused training; img/s is the group's "
                   f"aggregate)  [default: {profile_defaults('group_sizes')}]")
@renamed("--pad-input", "--pad-inputs", "pad_inputs", callback=csv_list(int), default=None,
              help="Run groups: each member's input zero-padded to this many channels, 0 for none (e.g. 0,4,8)  "
                   f"[default: {profile_defaults('pad_inputs')}]")
@click.option("--decode", "decode_tree", type=click.Path(exists=True, path_type=Path), default=None, metavar="TREE",
              help="Instead of the grid: time the ImageNet-style input pipeline on an ImageFolder tree, on one core "
                   "and with --loader-workers processes, and on a CUDA --device decoding there (nvJPEG); batch: the first "
                   "of --batch-sizes (64 if not given)")
@click.option("--decode-s", type=POSITIVE, default=10.0, show_default=True,
              help="With --decode: seconds each setting (one core, then the workers) decodes")
@click.option("--decode-images", type=COUNT, default=5000, show_default=True,
              help="With --decode: training images of the tree, drawn at random, to time on (the rate depends on "
                   "the images' sizes: time your own)")
@click.option("--image-size", type=COUNT, default=32,
              help="Square input size; at 64 and more the ImageNet-style family gets its 7x7 stem (224: ImageNet)")
@click.option("--device", default="auto", help="auto, cpu or cuda[:N].")
@click.option("--repeats", type=COUNT, default=5, help="Timed blocks per configuration (median and spread).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, help="Untimed steps first.")
@click.option("--block-s", type=POSITIVE, default=0.2, help="Target seconds per timed block.")
@click.option("--baseline/--no-baseline", default=True, help="Also time the common DataLoader pipeline against ours.")
@click.option("--baseline-model", default="resnet20")
@click.option("--baseline-batch-size", type=COUNT, default=128)
@renamed("--loader-workers", "--workers", "workers", type=click.IntRange(min=0), default=None,
              help=f"DataLoader workers of the baseline  [default: {profile_defaults('workers')}]")
@click.option("--data-root", type=click.Path(path_type=Path), default=None, help="CIFAR-10 for the baseline  [default: $RESBENCH_DATA; synthetic if absent]")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/profile"))
@click.option("--name", default=None, help="File name of the parquet  [default: from device and torch version]")
@click.option("--against", type=click.Path(path_type=Path), default=None, metavar="PROFILE",
              help="A saved profile (.parquet, or a folder such as results/reference-profile-h200): "
                   "write this machine / reference for every configuration both measured.")
@friendly_errors
def profile(device, decode_tree, decode_s, decode_images, image_size, repeats, warmup, block_s, baseline, baseline_model, baseline_batch_size,
            data_root, out, name, against, **given):
    """Training and inference img/s, MFU and memory over a grid of configurations.

    \b
    Examples:
      resbench profile
      resbench profile --nets resnet20,plain56 --batch-sizes 128,512 --executions eager,compile,cudagraph
      resbench profile --nets resnet20 --batch-sizes 128 --against results/reference-profile-h200
      resbench profile --nets resnet20,resnet56 --batch-sizes 128 --group-sizes 1,2,5,10,20 --executions cudagraph
      resbench profile --nets resnet18,resnet34,plain34 --image-size 224 --batch-sizes 64,256
    """
    import pandas as pd

    from bench import profile as prof
    from bench import profile_tables as tables
    from bench.specs import Execution
    from bench.sweep import check_writable

    ex = Execution.for_device(device)
    if decode_tree is not None:
        import os

        check_writable(out)
        workers = given.get("workers")
        on_gpu = ex.device.startswith("cuda")
        df = prof.decode_profile(decode_tree, workers=(0,) + ((workers or os.cpu_count() or 1),), seconds=decode_s,
                                 device=ex.device if on_gpu else None, batch_size=(given.get("batch_sizes") or [64])[0],
                                 sample=decode_images, log=click.echo)
        click.echo(str(tables.save(df, out, name or "decode-" + prof.default_name(ex.device).removeprefix("profile-"))))
        return
    reference = tables.read_reference(against) if against else None  # a bad file stops us before any timing
    grid = prof.resolve_grid(ex.device, **given)
    workers = grid.pop("workers")
    check_writable(out)
    df = prof.profile(grid.pop("models"), grid.pop("batch_sizes"), device=ex.device, log=click.echo, repeats=repeats,
                      warmup=warmup, block_s=block_s, image_size=image_size, **grid)
    if baseline:
        pipe = prof.pipeline_comparison(baseline_model, baseline_batch_size, ex.device, data_root=data_root,
                                        workers=workers, log=click.echo)
        df = pd.concat([df, pipe], ignore_index=True)
    name = name or prof.default_name(ex.device)
    click.echo(str(tables.save(df, out, name)))
    if reference is not None:
        matched, unmatched = tables.against(df, reference)
        if len(matched):
            click.echo(matched.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        for row in unmatched.itertuples(index=False):
            click.echo(f"no match in {against} for: " + ", ".join(f"{k}={v}" for k, v in zip(tables.CONFIG_KEYS, row)))
        for path in tables.save_against(matched, out, name):
            click.echo(str(path))


profile.sections = {
    "What to time": ["models", "batch_sizes", "precisions", "formats", "executions", "modes", "group_sizes",
                     "pad_inputs", "image_size", "device"],
    "How": ["repeats", "warmup", "block_s"],
    "The common pipeline against ours": ["baseline", "baseline_model", "baseline_batch_size", "workers", "data_root"],
    "The ImageNet-style input pipeline instead (--decode)": ["decode_tree", "decode_s", "decode_images"],
    "Output": ["out", "name", "against"],
}


@main.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice([p for p in _presets() if p != "smoke"]), default="he2015", show_default=True,
              help="The sweep to price (smoke's narrow nets are not in a profile, which times width-1 nets).")
@renamed("--kinds", "--models", "kinds", callback=csv_list(str), default=None,
         help="Network kinds  [default: the preset's]")
@click.option("--depths", callback=csv_list(int), default=None, help="[default: the preset's]")
@click.option("--seeds", callback=csv_list(int), default=None, help="Runs per net  [default: the preset's]")
@click.option("--gpus-per-run", type=COUNT, default=1, show_default=True,
              help="GPUs of each data-parallel run (the profile's rate per GPU at the batch each GPU gets)")
@click.option("--decode", "decode_path", type=click.Path(path_type=Path), default=None, metavar="DECODE_PROFILE",
              help="A `resbench profile --decode` parquet or folder: add the CPU cores that would feed each GPU, and "
                   "the rate training would reach decoding on the GPU (both on its stream)")
@friendly_errors
def estimate(profile_path, preset, kinds, depths, seeds, gpus_per_run, decode_path):
    """Estimate a sweep's GPU-hours (device-hours for a CPU profile) from a saved profile (training steps only, a
    low estimate).

    PROFILE: a parquet that `resbench profile` wrote, or a folder holding profile/*.parquet.

    \b
    Examples:
      resbench estimate results/reference-profile-h200 --preset he2015 --depths 20,56,110 --seeds 0,1,2,3,4
      resbench estimate results/profile-imagenet --preset he2015-imagenet --gpus-per-run 8 --decode results/decode
    """
    import textwrap

    import pandas as pd

    from bench import cost
    from bench.profile_tables import DECODE_KEYS, read_reference

    decode = read_reference(decode_path, "--decode", columns=DECODE_KEYS) if decode_path else None
    profile = read_reference(profile_path, "PROFILE")
    df = cost.estimate(profile, preset, models=kinds, depths=depths, seeds=seeds, gpus_per_run=gpus_per_run,
                       decode=decode)
    device = cost.profiled_device(profile)
    per = "GPU" if device.startswith("GPU") else "device"
    unit = f"{per}-hours"
    timed = (df["execution"] + " " + df["precision"].fillna("") + " " + df["memory_format"].fillna("")).str.strip()
    shown = pd.DataFrame({"net": df["net"], "runs": df["runs"], f"{per}s/run": df["gpus_per_run"],
                          f"batch/{per}": df["batch_per_gpu"], "timed as": timed,
                          f"img/s per {per}": df["img_per_s_per_gpu"].round().astype("Int64"),
                          "h per run": df["hours_per_run"], unit: df["gpu_hours"]})
    for extra, name in (("cpu_cores_per_gpu", f"CPU cores per {per}"), ("img_per_s_decoding_on_gpu",
                                                                        f"img/s decoding on the {per}")):
        if extra in df:
            shown[name] = df[extra]
    click.echo(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-"))
    known = df.dropna(subset=["gpu_hours"])
    say(textwrap.fill(f"total: {known['gpu_hours'].sum():.3g} {unit} for {int(known['runs'].sum())} runs "
               f"({len(known)} of {len(df)} nets profiled) on the profile's {device}; training steps only, at the "
               f"profiled rates, linear over a run's devices: a low estimate", 100))
    missing = df.loc[df["gpu_hours"].isna(), "net"].tolist()
    if missing:
        say(textwrap.fill(f"not profiled at batch {df['batch_per_gpu'].iloc[0]} per {per}: {', '.join(missing)} "
                   f"(resbench profile --nets {','.join(missing)} ...)", 100))
    for line in cost.decode_source(decode, profile) if decode is not None else ():
        say(textwrap.fill(line, 100))
    decode_batch = df.attrs.get("decode_batch")
    if decode_batch is not None and decode_batch != df["batch_per_gpu"].iloc[0]:
        say(textwrap.fill(f"note: the decode profile was timed at batch {decode_batch}; each GPU of this run decodes "
                   f"{df['batch_per_gpu'].iloc[0]} at a time (resbench profile --decode TREE --batch-sizes "
                   f"{df['batch_per_gpu'].iloc[0]} times that)", 100))
