"""How a sweep is carried out: the Launch the CLI builds from its options (checked here, once) and
``execute`` consumes, in phases (a tuned sweep's grid, then its chosen lrs), on one of four executors:
this process, parallel worker processes, a data-parallel run's processes, or a Slurm job array.

The policy lives here and in specs.Execution, never in the CLI: a data-parallel run trains alone, so
``--fuse auto`` means one run per group there (an explicit group size is refused), and it runs eager by
default, since DDP's gradient hooks cannot be captured in a CUDA graph (an explicit cudagraph is refused).
"""
from __future__ import annotations

import os

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from bench import sweep as sw
from bench.specs import AUTO_GROUP, Fuse
from bench.specs import Execution, RunSpec, SweepSpec


@dataclass(frozen=True)
class Launch:
    executor: str = "local"  # local | slurm
    device: str = "auto"  # as asked; on Slurm resolved on the compute node
    overrides: dict = field(default_factory=dict)  # Execution fields asked for (None: the device's default)
    fuse: Fuse = Fuse()  # auto
    world: int = 1  # processes per run (data-parallel above 1)
    nodes: int = 1  # Slurm: nodes a data-parallel run spans
    sync_bn: bool = False
    jobs: int | None = None  # CPU: runs at a time in worker processes
    runs_per_gpu: int = 1
    slurm: dict = field(default_factory=dict)  # bench.slurm.array_plan's settings (partition, time, cores, memory)
    wait: bool = True  # Slurm: follow the jobs

    @classmethod
    def build(cls, *, executor: str = "local", device: str = "auto", overrides: dict | None = None,
              fuse: Fuse = Fuse(), gpus_per_run: int = 1, procs_per_run: int = 1, nodes: int = 1, sync_bn: bool = False,
              batch_size: int, **rest) -> "Launch":
        """The launch the options ask for; ValueError naming what does not go together."""
        cuda = executor == "slurm" and gpus_per_run > 0 or executor == "local" and _local_cuda(device)
        world = world_size(executor, cuda, gpus_per_run, procs_per_run, nodes, sync_bn, batch_size)
        if world > 1 and fuse.size not in (None, 1):
            raise ValueError("a data-parallel run trains alone: --fuse K does not go with several processes per run")
        launch = cls(executor=executor, device=device, overrides=dict(overrides or {}),
                     fuse=Fuse(1) if world > 1 else fuse, world=world, nodes=nodes, sync_bn=sync_bn,
                     slurm=dict(rest.pop("slurm", {})) | dict(gpus_per_run=gpus_per_run), **rest)
        if executor == "local":
            launch.execution()  # resolved now: a device or execution that cannot be is said before anything runs
        return launch

    def execution(self) -> Execution:
        """How each run executes here (local executors; Slurm tasks resolve their own on the node)."""
        return Execution.for_device(self.device, **self.overrides, world_size=self.world, sync_bn=self.sync_bn)

    def bn_batch(self, batch_size: int) -> int | None:
        """The images each BatchNorm normalises over, where fewer than the batch (the run's identity)."""
        return None if self.world == 1 or self.sync_bn else batch_size // self.world

    def task_overrides(self) -> dict:
        """What a Slurm task's Execution is given (its device is resolved there)."""
        return self.overrides | (dict(world_size=self.world, sync_bn=self.sync_bn) if self.world > 1 else {})


def _local_cuda(device: str) -> bool:
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return device.startswith("cuda")


def world_size(executor: str, cuda: bool, gpus: int, procs: int, nodes: int, sync_bn: bool, batch: int) -> int:
    """The processes one run trains with: GPUs per run on CUDA (times nodes under Slurm), --procs-per-run
    without GPUs; checked against the batch, which they split."""
    if executor == "local" and nodes > 1:
        raise ValueError("--nodes is for --executor slurm (locally a run's processes share one machine)")
    if not cuda and gpus > 1:
        raise ValueError("--gpus-per-run above 1 needs GPUs; on the CPU use --procs-per-run N")
    if cuda and procs > 1:
        raise ValueError("with GPUs a data-parallel run has one process per GPU: use --gpus-per-run N")
    world = (gpus if cuda else procs) * nodes
    if sync_bn and not cuda:
        raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
    if world > 1 and batch % world:
        raise ValueError(f"the batch of {batch} images does not split over {world} processes")
    return world


def execute(spec: SweepSpec, out: Path, launch: Launch, *, data_root=None, download: bool = False,
            log=print) -> list[RunSpec]:
    """Train (or submit) what ``spec`` asks for and ``out`` lacks, phase after phase: each phase's runs are those
    knowable then (a tuned sweep's chosen runs once their grid is recorded), none twice in one call. Returns
    every run of the sweep as it stands."""
    if launch.executor == "slurm" and shutil.which("sbatch") is None:
        raise ValueError("--executor slurm needs Slurm's sbatch on PATH (run this on a login node)")
    sw.write_sweep_toml(spec, out)
    tried: set[str] = set()
    while True:
        runs, todo = sw.next_phase(spec, out, tried)
        if not todo and len(tried) > len(todo):  # an earlier phase ran: nothing new became knowable
            return runs
        done = len(runs) - len(todo)
        trained = (_on_slurm if launch.executor == "slurm" else _here)(spec, runs, todo, done, out, launch,
                                                                         data_root=data_root, download=download, log=log)
        if not todo or not trained:
            return sw.expand(spec, out)
        if spec.lr_grid:
            log(sw.tuning_summary(out))


def _here(spec, runs, todo, done, out, launch, *, data_root, download, log) -> bool:
    """One phase on this machine: in this process, in worker processes, or as data-parallel runs."""
    ex = launch.execution()
    jobs = launch.jobs if launch.jobs is not None else cpu_jobs(ex, len(todo))
    slots = sw.worker_slots(ex.device, jobs, launch.runs_per_gpu)
    groups = sw.plan_groups(todo, launch.fuse, ex, in_process=len(slots) == 1)
    fused = sw.describe_groups(groups)
    where = (f" in {len(slots)} processes of {slots[0]['OMP_NUM_THREADS']} thread(s)" if len(slots) > 1 and
             ex.device == "cpu" else "")
    log(f"sweep {spec.name}: {sw.describe_runs(spec, runs)}, {done} already recorded, {len(todo)} to train on "
        f"{ex.device}{where}{' as ' + fused if fused else ''} -> {out}")
    if not todo:
        return False
    hint = group_hint(groups, launch.fuse, ex, launch.runs_per_gpu)
    if hint:
        log(hint)
    kw = dict(data_root=data_root, download=download, log=log)
    if launch.world > 1:
        sw.run_distributed(todo, out, ex, **kw)
    elif len(slots) > 1:
        sw.run_parallel(todo, out, ex, slots, fuse=launch.fuse, **kw)
    else:
        sw.run_local(todo, out, ex, fuse=launch.fuse, progress=True, groups=groups, **kw)  # a bar, or lines
    return True


def cpu_jobs(ex: Execution, todo: int) -> int | None:
    """The CPU's default runs at a time (no --jobs given): one process of one thread per core, up to the runs to
    train: small nets use two cores better as two runs than as one run of two threads (README, "What they take").
    ``RESBENCH_JOBS`` sets it (the tests set 1: the runs in their own process). None on CUDA (a process per GPU)."""
    if ex.device != "cpu":
        return None
    given = os.environ.get("RESBENCH_JOBS")
    return max(1, int(given)) if given else max(1, min(os.cpu_count() or 1, todo))


def _on_slurm(spec, runs, todo, done, out, launch, *, data_root, download, log) -> bool:
    """One phase as a Slurm job array; followed to its end unless ``launch.wait`` is off."""
    from bench import slurm

    submitted = slurm.submit(todo, out, device=launch.device, overrides=launch.task_overrides(), data_root=data_root,
                             fuse=launch.fuse, world=launch.world, nodes=launch.nodes, **launch.slurm) if todo else {}
    jobs = ", ".join(sorted({j.split("_")[0] for j in submitted.values()})) or "-"
    log(f"sweep {spec.name}: {sw.describe_runs(spec, runs)}, {done} recorded, {len(todo) - len(submitted)} already "
        f"queued, {len(submitted)} submitted to Slurm (job {jobs}) -> {out}")
    if not todo:
        return False
    if not launch.wait:
        if sw.cells_waiting(spec, out):
            log("a tuned sweep: each cell's chosen lr trains on the other seeds once its grid runs are recorded; "
                "submit the same command again then (it submits only what is missing)")
        return False
    if submitted:
        slurm.follow(submitted, out, log=log)
    return True


def dry_run(runs: list[RunSpec], launch: Launch) -> list[str]:
    """What `--executor slurm` would submit: the array's resources per task, then one line per task."""
    from bench import slurm

    params, groups = slurm.array_plan(runs, device=launch.device, fuse=launch.fuse, world=launch.world,
                                      nodes=launch.nodes, **launch.slurm)
    per_task = params["tasks_per_node"]
    return [f"dry run: {len(runs)} runs as an array of {len(groups)} tasks ({params['name']}), nothing submitted",
            f"each array task: {params['nodes']} node(s), {per_task} task(s) per node (a process each), "
            f"{params.get('gpus_per_node') or 0} GPU(s) per node, {params.get('cpus_per_task', 1)} CPUs per task, "
            f"{params['mem_gb'] / per_task:g} GB per task ({params['mem_gb']:g} GB per node), "
            f"{params['timeout_min']} minutes, at most {params['slurm_array_parallelism']} at once"
            + (f", partition {params['slurm_partition']}" if "slurm_partition" in params else "")
            + "".join(f", {k}={v}" for k, v in params["slurm_additional_parameters"].items())] + [
        f"  task {i}: {', '.join(r.run_id for r in group)}" for i, group in enumerate(groups)]


def group_hint(groups, fuse: Fuse, ex: Execution, runs_per_gpu: int) -> str | None:
    """What to do when --fuse auto on CUDA makes small groups because the grid has one seed: each depth's
    group is then its two twins, and a big GPU stays mostly idle."""
    sizes = [len(g) for g in groups]
    one_seed = len({s.seed for g in groups for s in g}) == 1
    if (fuse.size is not None or not ex.device.startswith("cuda") or not sizes or max(sizes) < 2
            or max(sizes) >= AUTO_GROUP or not one_seed or runs_per_gpu > 1):
        return None
    return (f"note: with one seed a group holds only the twins of one depth ({max(sizes)} runs); larger groups keep "
            f"a GPU busier: add seeds (--seeds 0,1,2,3,4 gives groups of {AUTO_GROUP}), or train several depth "
            f"groups side by side with --runs-per-gpu N")
