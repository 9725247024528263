"""The resbench command line: a thin Click layer that parses, builds a spec and calls one function."""
from __future__ import annotations

import contextlib
import functools
import signal
import sys
from pathlib import Path

import click

from bench.errors import DataError, Interrupted
from bench.progress import say
from bench.options import (COUNT, POSITIVE, PROFILE, RUN, SWEEP, Cluster, DataOptions, ExecutionOptions, Methods,
                           Parallelism, ProfileBaseline, ProfileDecode, ProfileGrid, ProfileOutput, ProfileTiming,
                           RecipeOverrides, RunParallel, RunTarget, SweepGrid, csv_list, load_config, presets,
                           renamed, sections, with_groups)
from bench.specs import LESION_DRAWS

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


def friendly_errors(fn):
    """Turn the library's expected errors into a one-line message and exit code 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ValueError, DataError, PermissionError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None

    return wrapper



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



def _fail_if_failed(runs, out: Path) -> None:
    from bench.records import finished

    status = finished(out)
    failed = [r.run_id for r in runs if status.get(r.run_id) == "failed"]
    if failed:
        raise click.ClickException(f"{len(failed)} run(s) failed (their error is in the records; "
                                   f"`resbench status {out}` lists them): {', '.join(failed)}")



@main.command(cls=Sectioned)
@click.argument("model")
@with_groups(*RUN)
@friendly_errors
def run(model, **o):
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
    from bench.specs import PRESETS, Execution, RunSpec
    from bench.sweep import check_writable, run_local

    t, sync_bn = RunTarget.take(o), RunParallel.take(o).sync_bn
    data = DataOptions.take(o).resolved(t.preset)
    recipe = RecipeOverrides.take(o).recipe(t.preset)
    exo = ExecutionOptions.take(o)
    world = ddp.place().world  # torchrun's or srun's processes: one run over them
    ex = Execution.for_device(exo.device, **exo.overrides(data), world_size=world, sync_bn=sync_bn)
    spec = RunSpec(model=model, recipe=recipe, seed=t.seed, dataset=data.dataset,
                   width=t.width if t.width is not None else PRESETS[t.preset]["width"],
                   shortcut=t.shortcut.upper(), sweep=t.preset,
                   bn_batch=recipe.batch_size // world if world > 1 and not sync_bn else None)
    out = t.out or Path("results") / t.preset
    data.check()
    check_writable(out)
    place = ddp.init(ex.device.startswith("cuda"))
    with _stoppable():
        run_local([spec], out, ex, data_root=data.data_root, download=data.download, progress=True,
                  log=say if place.main else lambda line: None)
    ddp.leave()
    if place.main:
        _fail_if_failed([spec], out)


run.sections = sections(*RUN)


CONFIG = click.option("--config", type=click.Path(dir_okay=False), callback=load_config, is_eager=True,
                      expose_value=False, help="TOML file of option values (keys as option names); explicit options win.")


@main.command(cls=Sectioned)
@CONFIG
@with_groups(*SWEEP)
@friendly_errors
def sweep(**o):
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
    from bench.specs import PRESETS, SweepSpec

    g, m = SweepGrid.take(o), Methods.take(o)
    data = DataOptions.take(o).resolved(g.preset)
    recipe = RecipeOverrides.take(o).recipe(g.preset)
    exo, par, cl = ExecutionOptions.take(o), Parallelism.take(o), Cluster.take(o)
    p = PRESETS[g.preset]
    if cl.dry_run and cl.executor != "slurm":
        raise click.UsageError("--dry-run shows a Slurm job array: use it with --executor slurm")
    auto = resources(data.dataset, data.loader_workers if data.loader_workers is not None else 4)
    try:
        launch = lch.Launch.build(
            executor=cl.executor, device=exo.device, overrides=exo.overrides(data, par.pad_input), fuse=par.fuse,
            gpus_per_run=par.gpus_per_run, procs_per_run=par.procs_per_run, nodes=par.nodes, sync_bn=par.sync_bn,
            batch_size=recipe.batch_size, jobs=par.jobs, runs_per_gpu=par.runs_per_gpu, wait=cl.wait,
            slurm=dict(partition=cl.partition, time_min=cl.time_min, max_parallel=cl.max_parallel, extra=cl.extra(),
                       cpus_per_task=cl.cpus_per_task or auto["cpus_per_task"], mem_gb=cl.mem_gb or auto["mem_gb"]))
    except ValueError as e:  # options that do not go together: a usage error, before anything runs
        raise click.UsageError(str(e)) from None
    spec = SweepSpec(name=g.name or g.preset, recipe=recipe, models=g.kinds or p["models"],
                     depths=g.depths or p["depths"], seeds=g.seeds if g.seeds is not None else p["seeds"],
                     width=g.width if g.width is not None else p["width"], shortcut=g.shortcut.upper(),
                     dataset=data.dataset, bn_batch=launch.bn_batch(recipe.batch_size), lr_for=m.lr_for or (),
                     lr_grid=m.grid(g.preset), method_recipe=m.method_recipe, grid_seeds=m.grid_seeds,
                     grid_widen=m.lr_grid_widen, lr_grid_for=m.lr_grid_for or (), weight_decay_for=m.weight_decay_for or ())
    runs = spec.runs()  # validates every model name before anything is written
    if cl.dry_run:  # what would go to Slurm: no data, folder or sbatch needed
        for line in lch.dry_run(runs, launch):
            click.echo(line)
        return
    out = g.out or Path("results") / spec.name
    data.check()
    sw.check_writable(out)
    with _stoppable():
        runs = lch.execute(spec, out, launch, data_root=data.data_root, download=data.download, log=say)
    if launch.executor == "local" or launch.wait:
        say(sw.summary(runs, out).to_string(index=False, na_rep="-"))
    if launch.executor == "local":
        _fail_if_failed(runs, out)


sweep.sections = sections(*SWEEP, first={"What to train": ["config"]})


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
@with_groups(*PROFILE)
@friendly_errors
def profile(**o):
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

    from dataclasses import asdict

    grid_o, how, base, dec, res = (ProfileGrid.take(o), ProfileTiming.take(o), ProfileBaseline.take(o),
                                   ProfileDecode.take(o), ProfileOutput.take(o))
    ex = Execution.for_device(grid_o.device)
    if dec.decode_tree is not None:
        import os

        check_writable(res.out)
        on_gpu = ex.device.startswith("cuda")
        df = prof.decode_profile(dec.decode_tree, workers=(0,) + ((base.workers or os.cpu_count() or 1),),
                                 seconds=dec.decode_s, device=ex.device if on_gpu else None,
                                 batch_size=(grid_o.batch_sizes or [64])[0], sample=dec.decode_images, log=click.echo)
        click.echo(str(tables.save(df, res.out, res.name or "decode-" +
                                   prof.default_name(ex.device).removeprefix("profile-"))))
        return
    reference = tables.read_reference(res.against) if res.against else None  # a bad file stops us before any timing
    given = {k: v for k, v in asdict(grid_o).items() if k not in ("image_size", "device")}
    grid = prof.resolve_grid(ex.device, **given, workers=base.workers)
    workers = grid.pop("workers")
    check_writable(res.out)
    df = prof.profile(grid.pop("models"), grid.pop("batch_sizes"), device=ex.device, log=click.echo,
                      repeats=how.repeats, warmup=how.warmup, block_s=how.block_s, image_size=grid_o.image_size, **grid)
    if base.baseline:
        pipe = prof.pipeline_comparison(base.baseline_model, base.baseline_batch_size, ex.device,
                                        data_root=base.data_root, workers=workers, log=click.echo)
        df = pd.concat([df, pipe], ignore_index=True)
    name = res.name or prof.default_name(ex.device)
    click.echo(str(tables.save(df, res.out, name)))
    if reference is not None:
        matched, unmatched = tables.against(df, reference)
        if len(matched):
            click.echo(matched.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        for row in unmatched.itertuples(index=False):
            click.echo(f"no match in {res.against} for: " + ", ".join(f"{k}={v}" for k, v in zip(tables.CONFIG_KEYS, row)))
        for path in tables.save_against(matched, res.out, name):
            click.echo(str(path))


profile.sections = sections(*PROFILE)


@main.command()
@click.argument("profile_path", metavar="PROFILE", type=click.Path(path_type=Path))
@click.option("--preset", type=click.Choice([p for p in presets() if p != "smoke"]), default="he2015", show_default=True,
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
