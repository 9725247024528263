"""Sweeps beyond one process: GPU pinning of the local executor, and a real Slurm through submitit.

The Slurm tests start a one-node cluster on loopback with tests/slurm/start.sh (munged, slurmctld,
slurmd; Debian's slurm-wlm is installed when missing). If it cannot start, they fail: a skipped
Slurm test would hide a broken executor.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bench import records
from bench.slurm import read_jobs
from bench.specs import Execution, Fuse, RunSpec, recipe
from bench.sweep import run_parallel, worker_slots

START = Path(__file__).resolve().parents[1] / "slurm" / "start.sh"
TINY = ["--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--batch-size", "32", "--train-size", "256",
        "--val-size", "64", "--test-size", "64", "--eval-every", "4", "--device", "cpu"]


def test_local_slots_pin_each_worker_to_one_gpu():
    slots = worker_slots("cuda", None, 2, visible=["0", "1"])
    assert [s["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "0", "1", "1"]
    assert len(worker_slots("cpu", 2, 4)) == 2 and worker_slots("cpu", None, 4)[0]["OMP_NUM_THREADS"]


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_parallel_workers_get_their_device(tmp_path):
    r = recipe("smoke", batch_size=32, iterations=4, eval_every=4, train_size=64, val_size=32, test_size=32)
    runs = [RunSpec("plain8", r, seed=s, width=0.25, dataset="synthetic") for s in range(6)]
    slots = [{"CUDA_VISIBLE_DEVICES": g} for g in ("0", "1")]  # a fake two-GPU list; the runs use the CPU
    lines = []
    run_parallel(runs, tmp_path, Execution.for_device("cpu"), slots, fuse=Fuse(2), log=lines.append)
    got = records.load(tmp_path)[0]
    assert len(got) == 6 and (got["status"] == "ok").all() and len(lines) == 6
    assert set(got["cuda_visible_devices"]) == {"0", "1"}
    # one worker per group of two: each group on one slot
    assert (got["group_size"] == 2).all() and got["group_id"].nunique() == 3
    assert (got.groupby("group_id")["cuda_visible_devices"].nunique() == 1).all()


@pytest.fixture(scope="module")
def slurm():
    res = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600)
    if res.returncode:
        pytest.fail(f"could not start Slurm with {START}:\n{res.stdout}\n{res.stderr}")
    return True


def _sweep(out, *extra, timeout=300):
    cmd = [sys.executable, "-m", "bench", "sweep", "--executor", "slurm", "--gpus-per-run", "0", "--time", "10",
           "--out", str(out), *TINY, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slurm
@pytest.mark.slow  # a real Slurm: out of the fast loop
def test_slurm_sweep_lands_every_row(slurm, tmp_path):
    res = _sweep(tmp_path, "--seeds", "0,1", "--iterations", "8", "--fuse", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 submitted to Slurm" in res.stdout
    runs, curves = records.load(tmp_path)
    assert len(runs) == 4 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    assert len(curves) == 8
    # one array task per group of two: each group's members share a task (job id) and a group_id
    jobs = read_jobs(tmp_path)
    assert (runs["group_size"] == 2).all() and runs["group_id"].nunique() == 2
    assert (runs.assign(job=runs["run_id"].map(jobs)).groupby("group_id")["job"].nunique() == 1).all()
    assert len(set(jobs.values())) == 2
    again = _sweep(tmp_path, "--seeds", "0,1", "--iterations", "8")
    assert "4 recorded" in again.stdout and "0 submitted" in again.stdout
    status = subprocess.run([sys.executable, "-m", "bench", "status", str(tmp_path)], capture_output=True, text=True)
    assert "ok: 4" in status.stdout and "_" in status.stdout  # array job ids such as 12_3


@pytest.mark.slurm
@pytest.mark.slow  # a real Slurm: out of the fast loop
def test_scancel_then_resubmit_redoes_only_the_missing_run(slurm, tmp_path):
    args = ["--seeds", "0,1,2", "--iterations", "100", "--models", "plain"]
    first = _sweep(tmp_path, *args, "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = records_jobs(tmp_path)
    victim_run, victim_job = sorted(jobs.items())[-1]
    subprocess.run(["scancel", victim_job], check=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the queue to drain
        q = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", victim_job.split("_")[0]], capture_output=True, text=True)
        if not q.stdout.strip():
            break
        time.sleep(1)
    runs, _ = records.load(tmp_path)
    assert victim_run not in set(runs["run_id"]) and len(runs) == 2
    second = _sweep(tmp_path, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 recorded" in second.stdout and "1 submitted" in second.stdout
    runs, curves = records.load(tmp_path)
    assert len(runs) == 3 and runs["run_id"].is_unique and (runs["status"] == "ok").all()
    assert victim_run in set(runs["run_id"])
    assert not curves.duplicated(["run_id", "iteration"]).any()


def records_jobs(out):
    from bench.slurm import read_jobs

    return read_jobs(out)


@pytest.mark.slurm
@pytest.mark.slow  # a real Slurm: out of the fast loop
def test_preempted_task_requeues_and_resumes_from_its_checkpoint(slurm, tmp_path):
    """USR2 is how Slurm warns of preemption or the time limit: submitit checkpoints and requeues
    the task, which continues from the run's own checkpoint."""
    # ~10 s of training: USR2 comes within a second of the first checkpoint (iteration 20), long before the end
    args = ["--seeds", "0", "--iterations", "500", "--eval-every", "20", "--models", "plain"]
    first = _sweep(tmp_path / "pre", *args, "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr
    (run_id, job), = records_jobs(tmp_path / "pre").items()
    ckpt = records.paths(tmp_path / "pre", run_id)["ckpt"]
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    deadline = time.time() + 420
    while time.time() < deadline:
        if records.paths(tmp_path / "pre", run_id)["run"].exists():
            break
        # Slurm holds a requeued job back ~2 minutes (reason BeginTime): start it now, the test is about
        # the requeue and the resume, not about that wait
        reason = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout
        if "PENDING" in reason and "BeginTime" in reason:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    runs, curves = records.load(tmp_path / "pre")
    assert len(runs) == 1 and runs.loc[0, "status"] == "ok", "the requeued task did not finish in time"
    assert 0 < runs.loc[0, "resumed_from"] < 500  # continued from the checkpoint, not from scratch
    info = subprocess.run(["scontrol", "show", "job", job.split("_")[0]], capture_output=True, text=True).stdout
    logs = "".join(p.read_text() for p in (tmp_path / "pre" / "slurm" / "logs").glob("*_log.out"))
    assert "Restarts=1" in info or "requeued" in logs.lower()
    # the same run uninterrupted, locally: identical curves (CPU training is deterministic for a given number of
    # threads; the task used the cores Slurm gave it, so the reference uses as many)
    threads = int(runs.loc[0, "cpu_threads"])
    ref = _sweep_local(tmp_path / "ref", *args, threads=threads)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    assert (records.load(tmp_path / "ref")[0]["cpu_threads"] == threads).all()
    cols = ["iteration", "lr", "train_loss", "train_err", "val_err", "test_err"]
    pd.testing.assert_frame_equal(curves[cols], records.load(tmp_path / "ref")[1][cols])


def _sweep_local(out, *extra, threads=None):
    cmd = [sys.executable, "-m", "bench", "sweep", "--out", str(out), *TINY, *extra]
    env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slurm
@pytest.mark.slow  # a real Slurm: out of the fast loop
def test_a_two_task_data_parallel_run_through_slurm(slurm, tmp_path):
    """One run, two Slurm tasks on CPU nodes (gloo), numbered by submitit's distributed environment."""
    res = _sweep(tmp_path, "--seeds", "0", "--models", "resnet", "--iterations", "8", "--procs-per-run", "2")
    assert res.returncode == 0, res.stdout + res.stderr
    runs = records.load(tmp_path)[0]
    assert len(runs) == 1 and runs.loc[0, "status"] == "ok", runs.get("error")
    assert (runs.loc[0, "world_size"], runs.loc[0, "bn_mode"], runs.loc[0, "bn_batch"]) == (2, "per process", 16)
    assert len(read_jobs(tmp_path)) == 1


@pytest.mark.slurm
@pytest.mark.slow  # a real Slurm: out of the fast loop
def test_a_tuned_sweep_submits_its_grid_then_the_chosen_lr_as_two_job_arrays(slurm, tmp_path):
    """The chosen runs are knowable only once the grid is recorded: one array per phase, the grid's runs fused
    in groups like any sweep's; with --no-wait the chosen runs are submitted by the next call."""
    args = ["--seeds", "0,1", "--iterations", "8", "--models", "plain,resnet", "--lr-grid", "0.01,0.1", "--fuse", "2",
            "--lr-grid-widen", "0"]  # a grid that never grows: two phases exactly
    first = _sweep(tmp_path, *args, "--no-wait")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "4 submitted to Slurm" in first.stdout and "once its grid runs are recorded" in first.stdout
    deadline = time.time() + 240
    while len(records.load(tmp_path)[0]) < 4 and time.time() < deadline:
        time.sleep(1)
    second = _sweep(tmp_path, *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 submitted to Slurm" in second.stdout
    runs = records.load(tmp_path)[0]
    assert len(runs) == 6 and (runs["status"] == "ok").all()
    assert sorted(runs["lr_tuning"]) == ["chosen"] * 2 + ["grid"] * 4 and set(runs["lr_grid"]) == {(0.01, 0.1)}
    grid, chosen = runs[runs["lr_tuning"] == "grid"], runs[runs["lr_tuning"] == "chosen"]
    assert set(grid["seed"]) == {0} and set(chosen["seed"]) == {1} and (grid["group_size"] == 2).all()
    # a task per group: the grid's two (one per lr), then the chosen runs, together where their lrs agree
    assert len(set(read_jobs(tmp_path).values())) == 2 + chosen["lr"].nunique()
    for kind, lr in zip(chosen["kind"], chosen["lr"]):  # each net at the lr of its best grid run (validation)
        best = grid[grid["kind"] == kind].sort_values(["late_val_err", "lr"]).iloc[0]
        assert lr == best["lr"]


def test_a_dry_run_shows_the_cores_and_memory_each_task_asks_for_and_submits_nothing(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    base = ["sweep", "--executor", "slurm", "--preset", "he2015-imagenet", "--data-root", str(tmp_path / "no-data"),
            "--partition", "gpu", "--gpus-per-run", "8", "--time", "2880", "--out", str(tmp_path / "o"), "--dry-run"]
    res = CliRunner().invoke(main, base + ["--loader-workers", "10"])
    assert res.exit_code == 0, res.output
    # a process per GPU, each with its 10 decoding workers: 11 cores and 8 + 2 x 10 GB per task
    assert "8 task(s) per node (a process each), 8 GPU(s) per node, 11 CPUs per task, 28 GB per task" in res.output
    assert "224 GB per node" in res.output and "2880 minutes" in res.output and "partition gpu" in res.output
    assert res.output.count("  task ") == 4 and not (tmp_path / "o").exists()
    given = CliRunner().invoke(main, base + ["--cpus-per-task", "6", "--mem-gb", "40", "--slurm-opt", "account=me"])
    assert "6 CPUs per task, 40 GB per task" in given.output and "account=me" in given.output
    cifar = CliRunner().invoke(main, ["sweep", "--executor", "slurm", "--preset", "he2015", "--gpus-per-run", "1",
                                      "--depths", "20", "--out", str(tmp_path / "c"), "--dry-run"])
    assert "1 GPU(s) per node, 1 CPUs per task, 8 GB per task" in cifar.output  # the data sits on the GPU
    local = CliRunner().invoke(main, ["sweep", "--dry-run", "--out", str(tmp_path / "l")])
    assert local.exit_code == 2 and "--dry-run shows a Slurm job array" in local.output
