"""The Slurm executor: a sweep's pending runs as one job array, through submitit.

Each array task trains one group (bench.fuse.plan: runs of one shape as one grouped network, or
one run alone) and writes its runs' own files into the shared results folder. The task is
checkpointable: when Slurm preempts or times it out, submitit requeues it, and each run continues
from its own checkpoint (ckpt/<run_id>.pt). Submitting the same sweep again submits only
the runs that have no record and no job still queued or running.

Job ids are kept in ``<results>/slurm/jobs.json`` (run_id -> job id) for ``resbench status``.
Whether a job is still alive is asked of ``squeue``; no accounting database is needed.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench import ddp, records
from bench.specs import Execution, Fuse, RunSpec

ALIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "PREEMPTED"}


class SlurmRun:
    """The callable each array task runs (pickled by submitit). Checkpointable: on preemption or
    timeout submitit calls ``checkpoint`` and requeues the same call, which resumes the run."""

    def __init__(self, out: str, device: str, overrides: dict, data_root: str | None):
        self.out, self.device, self.overrides, self.data_root = out, device, overrides, data_root

    def __call__(self, specs: list[dict] | dict) -> list[str]:
        """Train the group; each member's status ("ok", "diverged", "failed", or "skipped" where another
        trainer holds or finished it). A single spec dict (jobs of earlier versions) is a group of one."""
        from bench.claims import Skip
        from bench.train import run_recorded

        import os

        import torch

        if os.environ.get("SLURM_CPUS_PER_TASK"):  # use the cores Slurm gave us, not every core of the node
            torch.set_num_threads(int(os.environ["SLURM_CPUS_PER_TASK"]))
        runs = [RunSpec.from_dict(d) for d in (specs if isinstance(specs, list) else [specs])]
        place = ddp.Place()
        if self.overrides.get("world_size", 1) > 1:  # one task of a data-parallel run: its place from Slurm
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            place = ddp.init(str(self.device).startswith("cuda") or torch.cuda.is_available())
        recorded = records.finished(Path(self.out))
        runs = [r for r in runs if recorded.get(r.run_id) not in records.DONE]  # a requeued task's finished runs
        if not runs:
            return []
        ex = Execution.for_device(self.device, **self.overrides)  # resolved on the compute node
        results = run_recorded(runs, Path(self.out), ex, data_root=self.data_root, progress=True)  # lines in the log
        if results is None:  # a rank other than 0 raised: its task fails (rank 0 recorded the run)
            raise RuntimeError(f"this process (rank {place.rank}) failed; its traceback is in "
                               f"{records.paths(self.out, runs[0].run_id)['errors']}")
        if any(not isinstance(r, Skip) and r["status"] == "failed" for r in results):
            return [r["status"] for r in results]
        ddp.leave()
        return ["skipped" if isinstance(res, Skip) else res["status"] for res in results]

    def checkpoint(self, *args, **kwargs):
        import submitit

        # nothing to save here: the run checkpoints itself at every evaluation point
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def jobs_file(out: Path) -> Path:
    return Path(out) / "slurm" / "jobs.json"


def read_jobs(out: Path) -> dict[str, str]:
    path = jobs_file(out)
    return json.loads(path.read_text()) if path.exists() else {}


def queue_states(job_ids) -> dict[str, str]:
    """job id -> state for the given ids still known to squeue (finished ones are absent)."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    if not ids:
        return {}
    res = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True, text=True)
    if res.returncode and "Invalid job id" not in res.stderr:
        raise RuntimeError(f"squeue failed: {res.stderr.strip()}")
    return dict(line.split()[:2] for line in res.stdout.splitlines() if line.strip())


def alive(out: Path) -> dict[str, str]:
    """run_id -> job id of the runs whose job is queued or running."""
    jobs = read_jobs(out)
    states = queue_states(jobs.values())
    return {rid: jid for rid, jid in jobs.items() if states.get(jid) in ALIVE}


def resources(dataset: str, loader_workers: int, world: int = 1) -> dict:
    """What one task asks Slurm for besides GPUs when not told: a core for the training process plus one per
    decoding worker of ImageNet-style data (those run in the task too), and memory for the process (CUDA's
    context, the CIFAR set held decoded) plus its workers' decoding. Per task: a data-parallel run has one
    task per process."""
    from bench.datasets import TABLE

    workers = loader_workers if TABLE[dataset].streams else 0
    return dict(cpus_per_task=1 + workers, mem_gb=MEM_GB_TASK + MEM_GB_WORKER * workers)


MEM_GB_TASK = 8  # the training process: CUDA's host-side context and libraries, the data set or its index
MEM_GB_WORKER = 2  # a decoding worker: its copy of the modules, prefetched batches of 480-px images


def array_plan(runs: list[RunSpec], *, device: str = "auto", partition: str | None = None, gpus_per_run: int = 0,
               time_min: int = 60, max_parallel: int = 16, cpus_per_task: int | None = None,
               mem_gb: int | None = None, extra: dict | None = None, fuse: Fuse = Fuse(1), world: int = 1,
               nodes: int = 1) -> tuple[dict, list[list[RunSpec]]]:
    """(the array's submitit parameters, its groups: one array task each) for ``runs``; nothing is submitted."""
    from bench.fuse import plan

    if world % nodes:
        raise ValueError(f"{world} processes per run do not split over {nodes} nodes")
    per_node = world // nodes
    params = dict(timeout_min=time_min, slurm_array_parallelism=max_parallel, tasks_per_node=per_node, nodes=nodes,
                  name=f"resbench-{runs[0].sweep or 'sweep'}", slurm_additional_parameters=dict(extra or {}))
    if partition:
        params["slurm_partition"] = partition
    if gpus_per_run:
        params["gpus_per_node"] = gpus_per_run if world == 1 else per_node
    if cpus_per_task:
        params["cpus_per_task"] = cpus_per_task
    if mem_gb:
        params["mem_gb"] = mem_gb * per_node  # Slurm's --mem is per node: each of its tasks' share
    groups = plan(runs, fuse, "cuda" if gpus_per_run or str(device).startswith("cuda") else "cpu")
    return params, groups


def submit(runs: list[RunSpec], out: Path, *, device: str = "auto", overrides: dict | None = None, data_root=None,
           **plan_kw) -> dict[str, str]:
    """Submit ``runs`` (already filtered to the pending ones) as one array, one task per group
    (``fuse``, bench.fuse.plan; "auto" groups when tasks get a GPU); returns run_id -> job id. A
    data-parallel run (``world`` > 1) is one array element of ``world`` tasks over ``nodes`` nodes
    (one GPU each where ``gpus_per_run``), which submitit's distributed environment numbers.
    ``plan_kw``: array_plan's (partition, GPUs, time, cores and memory per task, ...)."""
    import submitit

    out = Path(out).resolve()
    busy = alive(out)
    todo = [r for r in runs if r.run_id not in busy]
    if not todo:
        return {}
    params, groups = array_plan(todo, device=device, **plan_kw)
    executor = submitit.AutoExecutor(folder=out / "slurm" / "logs", cluster="slurm")
    executor.update_parameters(**params)
    task = SlurmRun(str(out), device, dict(overrides or {}), str(data_root) if data_root else None)
    jobs = executor.map_array(task, [[r.to_dict() for r in g] for g in groups])
    submitted = {r.run_id: j.job_id for g, j in zip(groups, jobs) for r in g}
    all_jobs = read_jobs(out) | submitted
    records.atomic_write(jobs_file(out), lambda tmp: tmp.write_text(json.dumps(all_jobs, indent=1)))
    return submitted


def follow(submitted: dict[str, str], out: Path, *, poll_s: float = 2.0, log=print, progress: bool = True) -> None:
    """Wait until every submitted job has left the queue, with a progress bar of recorded runs."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(submitted), desc="slurm", unit="run", disable=None if progress else True)
    done_before = 0
    while True:
        recorded = records.finished(out)
        done = sum(rid in recorded for rid in submitted)
        bar.update(done - done_before)
        done_before = done
        states = queue_states(submitted.values())
        if not any(s in ALIVE for s in states.values()):
            break
        time.sleep(poll_s)
    bar.close()
    lost = [rid for rid in submitted if rid not in records.finished(out)]
    if lost:
        log(f"{len(lost)} job(s) left the queue without a record (cancelled or killed); "
            f"submit the sweep again to redo them: {', '.join(lost)}")
