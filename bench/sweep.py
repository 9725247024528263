"""Sweeps: expand the grid, skip what is recorded, run the rest on an executor, summarise.

Executors:
  local, one slot   in this process, one group after another (a failing run is recorded and the
                    sweep goes on)
  local, N slots    N worker processes, each training one group after another; on GPUs each slot is
                    pinned to one device with CUDA_VISIBLE_DEVICES (``runs_per_gpu`` slots per device)
  slurm             one array task per group, see bench.slurm

A group is what ``fuse`` asks for (bench.fuse.plan): runs of one shape trained as one grouped
network, or each run alone (``Fuse(1)``, off: a group of one).
"""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd

from bench import claims, ddp, fuse as fusing, records, tuning
from bench.specs import Execution, Fuse, RunSpec, SweepSpec
from bench.train import first_rank_error, record_failure, run_recorded

DONE = records.DONE
EXIT_SKIPPED = 3  # a worker's exit code when another trainer holds (or has finished) its run


def pending(runs: list[RunSpec], out: Path) -> list[RunSpec]:
    done = records.finished(out)
    return [r for r in runs if done.get(r.run_id) not in DONE]


def expand(spec: SweepSpec, out: Path, recorded: pd.DataFrame | None = None) -> list[RunSpec]:
    """The runs ``spec`` asks for now, given the folder's records (``recorded``, else read from ``out``): every run
    of an untuned sweep; of a tuned one the grid runs (widened where a cell chose at an edge) and the chosen runs
    of the cells that have chosen (bench.tuning)."""
    if not spec.lr_grid:
        return spec.runs()
    recorded = records.load(out)[0] if recorded is None else recorded
    return spec.runs(tuning.chosen(recorded), tuning.grids(recorded))


EXPECTED = "expected.csv"  # the runs a folder's sweep asks for now: the report's missing runs, without the specs


def write_expected(runs: list[RunSpec], out: Path) -> None:
    """``out``/expected.csv: run_id, model, seed, kind, depth and net label of every run the sweep asks for now
    (rewritten at each phase of a tuned sweep); what the report calls missing, or running, is in it without a
    record."""
    table = pd.DataFrame([dict(run_id=r.run_id, model=r.model, seed=r.seed, kind=r.arch.kind, depth=r.arch.depth,
                               net_label=r.net_label) for r in runs],
                         columns=["run_id", "model", "seed", "kind", "depth", "net_label"])
    records.atomic_write(Path(out) / EXPECTED, lambda tmp: table.to_csv(tmp, index=False))


def next_phase(spec: SweepSpec, out: Path, tried: set[str]) -> tuple[list[RunSpec], list[RunSpec]]:
    """(every run the sweep asks for now, those still to train and not in ``tried``), adding the latter to
    ``tried``: called until nothing is left, it trains a tuned sweep's grid, then its chosen runs, and never
    the same run twice in one command (a run that failed waits for the next sweep)."""
    runs = expand(spec, out)
    write_expected(runs, out)
    todo = [r for r in pending(runs, out) if r.run_id not in tried]
    tried |= {r.run_id for r in todo}
    return runs, todo


def cells_waiting(spec: SweepSpec, out: Path) -> int:
    """A tuned sweep's (kind, depth) cells with no lr chosen yet (grid runs not all recorded, or widening)."""
    return len(spec.models) * len(spec.depths) - len(tuning.chosen(records.load(out)[0])) if spec.lr_grid else 0


def describe_runs(spec: SweepSpec, runs: list[RunSpec]) -> str:
    """'12 runs', or for a tuned sweep what they are: the grid on the grid seeds, the chosen lrs on the others."""
    if not spec.lr_grid:
        return f"{len(runs)} runs"
    grid = sum(r.lr_tuning == "grid" for r in runs)
    cells = len(spec.models) * len(spec.depths)
    chosen = len({(r.arch.kind, r.arch.depth) for r in runs if r.lr_tuning == "chosen"})
    seeds = lambda s: ("seed " if len(s) == 1 else "seeds ") + ",".join(map(str, s))  # noqa: E731
    return (f"{len(runs)} runs (the lr grid, {grid} runs over {cells} cells on {seeds(spec.seeds[:spec.grid_seeds])}; "
            f"each cell's chosen lr on {seeds(spec.seeds[spec.grid_seeds:])} once its grid is recorded ({chosen} of "
            f"{cells} cells so far: {len(runs) - grid} runs)")


def tuning_summary(out: Path) -> str:
    """The tuned sweep's cells so far: chosen lr (on validation error), edge flags, diverged grid runs."""
    table = tuning.cells(records.load(out)[0])
    return "lr chosen per cell on validation error:\n" + table.to_string(index=False, na_rep="-")


def check_writable(out: Path) -> None:
    """Fail before any training if ``out`` cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".probe"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write results to {out}: {e.strerror or e}; choose another --out") from e


def write_sweep_toml(sweep: SweepSpec, out: Path) -> SweepSpec:
    """Record the spec of this folder and return it: a call that extends an earlier sweep (more seeds,
    depths or kinds, same settings) keeps the union of both grids, so status and the report still
    know the earlier runs' plan. Other settings than the folder's are a ValueError, and nothing is written.
    """
    old = read_sweep_toml(out)
    if old is not None:
        sweep = old.union(sweep)
    records.atomic_write(out / "sweep.toml", lambda tmp: tmp.write_text(sweep.to_toml()))
    return sweep


def read_sweep_toml(out: Path) -> SweepSpec | None:
    path = Path(out) / "sweep.toml"
    return SweepSpec.from_toml(path.read_text()) if path.exists() else None


def plan_groups(runs: list[RunSpec], fuse: Fuse, ex: Execution, *, in_process: bool = True) -> list[list[RunSpec]]:
    """The groups to train (bench.fuse.plan). Trained in this process, none larger than the device's free
    memory holds; a worker process is not asked here (that would start CUDA in this one): it fits its
    group to its own device when it starts (bench.train.run_group)."""
    memory = fusing.free_memory(ex.device) if in_process and fuse.size != 1 else None
    return fusing.plan(runs, fuse, ex.device, ex=ex, memory=memory)


def describe_groups(groups: list[list[RunSpec]]) -> str:
    """'3 groups of 10 and 1 of 2' (largest first), or '' when every run trains alone."""
    sizes = sorted((len(g) for g in groups if len(g) > 1), reverse=True)
    if not sizes:
        return ""
    counts = {k: sizes.count(k) for k in dict.fromkeys(sizes)}
    parts = [f"{n} group{'s' if n > 1 else ''} of {k}" if i == 0 else f"{n} of {k}" for i, (k, n) in enumerate(counts.items())]
    alone = sum(len(g) == 1 for g in groups)
    return " and ".join(parts) + (f", {alone} alone" if alone else "")


def run_local(runs: list[RunSpec], out: Path, ex: Execution, *, fuse: Fuse = Fuse(1), data_root=None, download=False,
              progress=True, log=print, groups: list[list[RunSpec]] | None = None) -> None:
    """One group after another in this process (``groups``: plan_groups(runs, fuse, ex) unless given)."""
    n, i, t0 = len(runs), 0, time.perf_counter()
    groups = groups if groups is not None else plan_groups(runs, fuse, ex)
    order = [s for g in groups for s in g]  # the order they train in: done first, then what is left
    for group in groups:
        t = time.perf_counter()
        # one group's failure never stops the sweep (it is recorded); Ctrl-C does
        results = run_recorded(group, out, ex, data_root=data_root, download=download, progress=progress)
        for spec, res in zip(group, results):
            i += 1
            if isinstance(res, claims.Skip):  # another sweep trains it (or has done so)
                log(f"[{i}/{n}] {spec.run_id}: skipped ({res})")
            else:
                log(_line(i, n, res, time.perf_counter() - t) + _eta(order[:i], order[i:], time.perf_counter() - t0))


@functools.cache
def _macs(model: str, width: float, dataset: str) -> float:
    """Multiply-adds per image of a run's net (1 where it cannot be built here): a run's cost is this times its
    images trained."""
    import resnet
    from bench.datasets import SHAPES

    shape, classes = SHAPES.get(dataset, ((3, 32, 32), 10))
    try:
        return float(resnet.count_macs(resnet.build(model, classes, width=width, in_channels=shape[0]), shape))
    except Exception:  # a net this process cannot build (a plugin gone): count it as the others' average
        return float("nan")


def run_cost(spec: RunSpec) -> float:
    """What a run costs to train, in multiply-adds: its net's per image times the images it trains (steps x
    batch; an epoch-based schedule's epochs stand in for steps, the same unit within one sweep)."""
    return _macs(spec.model, spec.width, spec.dataset) * spec.recipe.iterations * spec.recipe.batch_size


def _eta(done: list[RunSpec], left: list[RunSpec], elapsed: float) -> str:
    """'; the sweep: about 12 min left': the time so far per multiply-add trained, times those left (a depth-44
    run costs about 5 times a depth-8 one, so counting runs as equal would be 3x too low); '' when done."""
    from bench.progress import duration

    if not left or not done:
        return ""
    costs = [run_cost(s) for s in done + left]
    known = [c for c in costs if c == c] or [1.0]
    costs = [c if c == c else sum(known) / len(known) for c in costs]
    spent, rest = sum(costs[:len(done)]), sum(costs[len(done):])
    return f"; the sweep: about {duration(elapsed / spent * rest)} left"


def _line(i: int, n: int, row: dict, seconds: float) -> str:
    if row["status"] == "failed":
        return f"[{i}/{n}] {row['run_id']}: failed ({row['error']})"
    lr = f" lr {row['lr']:g}" if row.get("lr_tuning") in ("grid", "chosen") else ""
    return (f"[{i}/{n}] {row['model']:<12} seed {row['seed']}{lr}: {row['status']}, train err "
            f"{100 * row['final_train_err']:.1f} %, test err {100 * row['final_test_err']:.1f} %, "
            f"{row['train_img_per_s']:.0f} img/s, {seconds:.0f} s")


def worker_slots(device: str, jobs: int | None, runs_per_gpu: int, visible: list[str] | None = None) -> list[dict]:
    """Environment overrides for each parallel slot.

    On CUDA, one slot per visible GPU times ``runs_per_gpu``, each pinned with
    CUDA_VISIBLE_DEVICES; on the CPU, ``jobs`` slots sharing the cores.
    """
    if device.startswith("cuda"):
        if visible is None:
            env = os.environ.get("CUDA_VISIBLE_DEVICES")
            if env is not None:
                visible = [v for v in env.split(",") if v.strip()]
            else:
                import torch

                visible = [str(i) for i in range(torch.cuda.device_count())]
        return [{"CUDA_VISIBLE_DEVICES": g} for g in visible for _ in range(runs_per_gpu)]
    n = jobs or 1
    threads = max(1, (os.cpu_count() or 1) // n)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(n)]


def run_parallel(runs: list[RunSpec], out: Path, ex: Execution, slots: list[dict], *, fuse: Fuse = Fuse(1),
                 data_root=None, download=False, log=print, poll_s: float = 0.2) -> None:
    """The groups over len(slots) worker processes (`python -m bench serve`), one group at a time each.

    A slot keeps its process from group to group, so torch, the trainer and the data are imported and loaded
    once per slot, not once per run (about 5 s a run on a 2-core CPU, a fifth of a smoke run at depth 8). A
    group that fails ends its process (a failure may leave state behind: CUDA's, a stuck loader) and the slot's
    next group starts a fresh one; a process that dies (killed, segfault, OOM kill) has its group recorded
    failed, as before."""
    queue = plan_groups(runs, fuse, ex, in_process=False)
    procs: dict[int, subprocess.Popen] = {}
    active: dict[int, tuple[list[RunSpec], Path, float]] = {}
    n, done, t0, finished = len(runs), 0, time.perf_counter(), []
    spec_dir = Path(tempfile.mkdtemp(prefix="resbench-specs-"))
    # a pinned worker sees its GPU as cuda:0
    wex = replace(ex, device="cuda" if ex.device.startswith("cuda") else ex.device)

    def close(slot: int) -> None:
        proc = procs.pop(slot, None)
        if proc is not None and proc.poll() is None:
            proc.stdin.close()  # end of input: the process exits
            proc.wait()

    try:
        while queue or active:
            for slot, env in enumerate(slots):
                if slot in active or not queue:
                    continue
                group = queue.pop(0)
                f = spec_dir / f"{group[0].run_id}.json"
                f.write_text(json.dumps(dict(specs=[s.to_dict() for s in group], execution=asdict(wex),
                                             data_root=str(data_root) if data_root else None, download=download)))
                if slot in procs and procs[slot].poll() is not None:  # ended between groups
                    procs.pop(slot)
                if slot not in procs:
                    procs[slot] = subprocess.Popen([sys.executable, "-m", "bench", "serve", "--out", str(out)],
                                                   env=os.environ | env, stdin=subprocess.PIPE, text=True)
                procs[slot].stdin.write(f"{f}\n")
                procs[slot].stdin.flush()
                active[slot] = (group, f, time.perf_counter())
            for slot, (group, f, t) in list(active.items()):
                reply, proc = _done_file(f), procs[slot]
                if reply.exists():
                    code = json.loads(reply.read_text())["code"]
                    if code not in (0, EXIT_SKIPPED):
                        close(slot)  # it exits by itself after a failure
                elif proc.poll() is not None:
                    code = proc.returncode
                    procs.pop(slot)
                else:
                    continue
                del active[slot]
                skipped = set(json.loads(_skipped_file(f).read_text())) if _skipped_file(f).exists() else set()
                for spec in group:
                    done += 1
                    if spec.run_id in skipped or code == EXIT_SKIPPED:
                        log(f"[{done}/{n}] {spec.run_id}: skipped (another trainer holds or finished it)")
                        continue
                    row = records.recorded(out, spec.run_id)
                    if row is None:  # the worker died without recording it (killed, segfault, OOM kill)
                        row = record_failure(spec, out, ex, RuntimeError(f"worker exited with code {code}"))
                    finished.append(spec)
                    log(_line(done, n, row, time.perf_counter() - t)
                        + _eta(finished, [s for g in queue for s in g] + [s for a in active.values() for s in a[0]],
                               time.perf_counter() - t0))
            time.sleep(poll_s)
        for slot in list(procs):
            close(slot)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for f in spec_dir.iterdir():
            f.unlink()
        spec_dir.rmdir()


def _skipped_file(spec_file: Path) -> Path:
    return spec_file.with_name(spec_file.stem + ".skipped.json")


def _done_file(spec_file: Path) -> Path:
    return spec_file.with_name(spec_file.stem + ".done.json")


def serve(out: Path, requests=None) -> int:
    """Entry point of a parallel sweep's worker process: train the group of each spec file named on a line of
    ``requests`` (stdin), one after another, answering each with ``<spec>.done.json`` ({"code": worker's exit
    code}); ends at the end of input, or after a group whose code is a failure (the sweep starts a fresh process
    for the slot's next group)."""
    requests = requests or sys.stdin
    while line := requests.readline():
        f = Path(line.strip())
        code = worker(f, out)
        records.atomic_write(_done_file(f), lambda tmp: tmp.write_text(json.dumps(dict(code=code))))
        if code not in (0, EXIT_SKIPPED):
            return code
    return 0


def worker(spec_file: Path, out: Path) -> int:
    """Train one group and record it (failed rows included): a worker process's group, or one rank's part of a
    data-parallel run. Writes the run_ids it skipped beside the spec file; returns EXIT_SKIPPED if it skipped
    them all."""
    job = json.loads(Path(spec_file).read_text())
    specs, ex = [RunSpec.from_dict(d) for d in job["specs"]], Execution(**job["execution"])
    place = ddp.init(ex.device.startswith("cuda"))  # one process of a data-parallel run, or alone
    try:
        results = run_recorded(specs, out, ex, data_root=job["data_root"], download=job["download"], progress=True)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal: the parent says what to do
        return 130
    if results is None or any(not isinstance(r, claims.Skip) and r["status"] == "failed" for r in results):
        return 1
    ddp.leave()
    if not place.main:  # rank 0 tells what happened
        return EXIT_SKIPPED if all(isinstance(r, claims.Skip) for r in results) else 0
    skipped = []
    for spec, res in zip(specs, results):
        if isinstance(res, claims.Skip):
            print(f"{spec.run_id}: skipped ({res})", file=sys.stderr)
            skipped.append(spec.run_id)
    records.atomic_write(_skipped_file(Path(spec_file)), lambda tmp: tmp.write_text(json.dumps(skipped)))
    return EXIT_SKIPPED if len(skipped) == len(specs) else 0


def run_distributed(runs: list[RunSpec], out: Path, ex: Execution, *, data_root=None, download=False,
                    log=print) -> None:
    """Each run as one data-parallel job on this machine: ``ex.world_size`` processes (bench.ddp.launch;
    one per GPU on CUDA, gloo processes sharing the cores on the CPU), one run after another. A run whose
    process fails is recorded failed (rank 0 records the error it saw; a rank killed from outside leaves
    the launcher to record it)."""
    spec_dir = Path(tempfile.mkdtemp(prefix="resbench-ddp-"))
    wex = replace(ex, device="cuda" if ex.device.startswith("cuda") else ex.device)
    try:
        for i, spec in enumerate(runs, 1):
            f = spec_dir / f"{spec.run_id}.json"
            f.write_text(json.dumps(dict(specs=[spec.to_dict()], execution=asdict(wex),
                                         data_root=str(data_root) if data_root else None, download=download)))
            t = time.perf_counter()
            if records.finished(out).get(spec.run_id) not in DONE and not claims.held(out).get(spec.run_id):
                records.start_attempt(out, spec.run_id)  # before any rank can write this attempt's traceback
            codes = ddp.wait(ddp.launch(["worker", str(f), "--out", str(out)], ex.world_size, {},
                                        cuda=ex.device.startswith("cuda")))
            if next((c for c in codes if c), 0) == EXIT_SKIPPED:  # every rank skips a run another trainer holds
                log(f"[{i}/{len(runs)}] {spec.run_id}: skipped (another trainer holds or finished it)")
                continue
            row = records.recorded(out, spec.run_id)
            failed = ddp.first_failure(codes)
            if row is None or (failed and row["status"] not in DONE):
                row = _record_rank_failure(spec, out, ex, row, *(failed or (0, 0)))
            log(_line(i, len(runs), row, time.perf_counter() - t))
    finally:
        for f in spec_dir.iterdir():
            f.unlink()
        spec_dir.rmdir()


def _record_rank_failure(spec: RunSpec, out: Path, ex: Execution, row: dict | None, rank: int, code: int) -> dict:
    """The record of a data-parallel run one of whose processes failed. Rank 0's own record stands where a
    rank raised (it names the rank whose traceback came first); the launcher records the run where rank 0
    could not (it was stopped first) or where a rank was killed from outside, which only the launcher sees:
    the others' tracebacks then say only that a peer went away."""
    if row is not None and code > 0:
        return row
    if code < 0:
        why = (f"rank {rank} of {ex.world_size} was killed by {ddp.signal_name(code)} (exited with code {code}); "
               f"the other ranks stopped with it")
    else:
        why = first_rank_error(out, spec.run_id, ex.world_size) or \
            f"rank {rank} of {ex.world_size} exited with code {code} and the run has no record"
    return record_failure(spec, out, ex, RuntimeError(why))


def summary(runs: list[RunSpec], out: Path) -> pd.DataFrame:
    """The sweep's table: one line per run of the grid, with its status (missing ones included)."""
    recorded, _ = records.load(out)
    ids = pd.DataFrame([dict(run_id=r.run_id, model=r.model, seed=r.seed, lr=r.recipe.lr) for r in runs])
    cols = ["run_id", "status", "final_train_err", "final_val_err", "final_test_err", "train_img_per_s"]
    table = ids.merge(recorded[cols], on="run_id", how="left")
    table["status"] = table["status"].fillna("pending")
    # errors in %, as the progress lines print them
    table = table.rename(columns={"final_train_err": "train err %", "final_val_err": "val err %",
                                  "final_test_err": "test err %", "train_img_per_s": "img/s"})
    for c in ("train err %", "val err %", "test err %"):
        table[c] = (100 * table[c].astype(float)).round(1)
    table["img/s"] = table["img/s"].astype(float).round(0)
    return table.drop(columns="run_id")


def _fs_time(out: Path) -> float:
    """The filesystem's time (claims.fs_now: heartbeats are its timestamps), or this node's clock where the
    claims folder cannot be written (a read-only copy of a results folder)."""
    try:
        return claims.fs_now(out)
    except OSError:
        return time.time()


def status(out: Path, fresh_s: float = 600) -> pd.DataFrame:
    """One row per run of the folder (its sweep.toml's grid plus anything recorded): model, seed,
    state (ok / diverged / failed / running / pending / interrupted), who holds it, Slurm job id, and the
    error a failed or diverged run recorded.

    A run without a record is "running" while a live claim holds it (bench.claims; ``held_by``
    names the holder) or its Slurm job is running; a stale claim makes it "interrupted" (rerun the
    sweep to take it over). Without a claim (folders of earlier versions), a checkpoint written in
    the last ``fresh_s`` seconds counts as running.
    """
    from bench import slurm

    out = Path(out)
    if not out.is_dir() or not any((out / p).exists() for p in ("sweep.toml", "runs", "claims", "ckpt", "curves")):
        raise FileNotFoundError(f"{out} holds no sweep (no sweep.toml, runs/ or claims/): not a results folder; give "
                                f"the folder `resbench sweep --out` wrote")
    spec = read_sweep_toml(out)
    runs, _ = records.load(out)
    rows = {r.run_id: dict(run_id=r.run_id, model=r.model, seed=r.seed)
            for r in (expand(spec, out, runs) if spec else [])}
    for r in runs.to_dict("records"):
        rows.setdefault(r["run_id"], dict(run_id=r["run_id"], model=r["model"], seed=r["seed"]))
    recorded = dict(zip(runs["run_id"], runs["status"]))
    errors = dict(zip(runs["run_id"], runs["error"]))
    jobs = slurm.read_jobs(out)
    holders = claims.held(out)
    for rid in holders:  # a run claimed by a sweep of another grid: model and seed from its run_id
        m = re.fullmatch(r"(.+?)-.*-s(\d+)-[0-9a-f]+", rid)
        rows.setdefault(rid, dict(run_id=rid, model=m.group(1) if m else None, seed=int(m.group(2)) if m else None))
    try:
        queue = slurm.queue_states(jobs.values()) if jobs else {}
    except (OSError, RuntimeError):  # no squeue here: report the job ids without their state
        queue = {}
    now = _fs_time(out) if holders else time.time()
    for rid, row in rows.items():
        ckpt = records.paths(out, rid)["ckpt"]
        job_state = queue.get(jobs.get(rid, ""))
        claim = holders.get(rid)
        if rid in recorded:
            state = recorded[rid]
        elif claim is not None:
            state = "interrupted" if claims.is_stale(claim, now) else "running"
        elif job_state in ("RUNNING", "COMPLETING"):
            state = "running"
        elif job_state in slurm.ALIVE:
            state = "pending"
        elif ckpt.exists():
            # a folder trained by a version with claims: a run with a checkpoint and no live claim has stopped
            # (Ctrl-C, a crash); before claims existed, a fresh checkpoint was the only sign of life
            aware = (out / "claims").is_dir()
            state = "interrupted" if aware or now - ckpt.stat().st_mtime >= fresh_s else "running"
        else:
            state = "pending"
        previous = records.previous_error(out, rid) if state == "running" else None
        if previous is not None:  # an attempt after a failed one
            state = "retrying"
        row.update(status=state, held_by=claims.describe(claim, now) if claim and rid not in recorded else None,
                   slurm_job=jobs.get(rid), slurm_state=job_state,
                   error=errors.get(rid) if state in ("failed", "diverged") else
                   f"last attempt: {previous}" if previous is not None else None)
    return pd.DataFrame(list(rows.values()),
                        columns=["run_id", "model", "seed", "status", "held_by", "slurm_job", "slurm_state", "error"])


def live_points(out: Path, table: pd.DataFrame) -> list[str]:
    """One line per running run of ``table`` (``status``): its last evaluation point, from its curve so far."""
    running = table[table["status"] == "running"]
    if not len(running):
        return []
    curves = records.table(Path(out) / "curves")
    lines = []
    for r in running.itertuples():
        mine = curves[curves["run_id"] == r.run_id]
        if not len(mine):
            lines.append(f"{r.model} seed {r.seed}: no evaluation point yet")
            continue
        p = mine.sort_values("iteration").iloc[-1]
        pct = lambda v: "-" if pd.isna(v) else f"{100 * v:.1f} %"  # noqa: E731
        lines.append(f"{r.model} seed {r.seed}: step {int(p['iteration'])}, train err {pct(p['train_err'])}, "
                     f"val err {pct(p['val_err'])}, test err {pct(p['test_err'])}, {p['img_per_s']:.0f} img/s")
    return lines
