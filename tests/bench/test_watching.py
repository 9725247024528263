"""Watching and stopping a sweep as people do: Ctrl-C and SIGTERM stop it cleanly and say how to resume, status
knows at once, a console that goes away (`| head`, a closed terminal) never fails a run, and the sweep's time
left is weighted by what each run costs."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import records
from bench.specs import RunSpec, recipe
from bench.sweep import _eta, run_cost

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "synthetic", "--width", "0.25", "--batch-size", "16", "--train-size", "64", "--val-size", "32",
        "--test-size", "32"]


def _sweep(out, *args):
    return [sys.executable, "-m", "bench", "sweep", *TINY, "--out", str(out), *args]


def _env():
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow  # subprocesses: left out of mutation runs
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_stopped_sweep_says_where_it_stood_and_status_says_interrupted_at_once(tmp_path, sig, code):
    out = tmp_path / "s"
    proc = subprocess.Popen(_sweep(out, "--kinds", "resnet", "--depths", "8", "--iterations", "2000", "--eval-every", "5"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "ckpt").glob("*.pt")):
        time.sleep(0.2)
    assert list((out / "ckpt").glob("*.pt")), "no checkpoint was written"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stdout + stderr
    assert "interrupted at step " in stderr and "of 2000 (resnet8 seed 0)" in stderr
    assert "rerun the same command to resume" in stderr and "Traceback" not in stderr
    status = subprocess.run([sys.executable, "-m", "bench", "status", str(out)], env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert "interrupted: 1" in status.stdout and "running: 0" in status.stdout, status.stdout
    assert not records.load(out)[0].shape[0]  # nothing recorded as failed


@pytest.mark.slow
def test_a_sweep_whose_output_goes_away_finishes_its_runs(tmp_path):
    out = tmp_path / "s"
    cmd = " ".join(_sweep(out, "--kinds", "plain,resnet", "--depths", "8", "--iterations", "40", "--eval-every", "2"))
    res = subprocess.run(["bash", "-c", f"{cmd} 2>&1 | head -n 2"], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert len(res.stdout.splitlines()) == 2
    deadline = time.time() + 240  # the sweep goes on after head has gone
    while time.time() < deadline and len(records.finished(out)) < 2:
        time.sleep(0.5)
    runs = records.load(out)[0]
    assert sorted(runs["status"]) == ["ok", "ok"], runs[["model", "status", "error"]]


def test_the_time_left_weighs_each_run_by_its_multiply_adds():
    small, big = (RunSpec(f"resnet{d}", recipe("smoke")) for d in (20, 44))
    ratio = run_cost(big) / run_cost(small)
    assert ratio == pytest.approx(97.2 / 40.6, rel=0.01)  # the README's multiply-adds of ResNet-44 and -20, by hand
    assert _eta([small], [big], 10.0) == f"; the sweep: about {10 * ratio:.0f} s left"
    assert _eta([small, big], [], 10.0) == ""


SWEEP = ["sweep", *TINY, "--depths", "8", "--iterations", "4", "--eval-every", "2"]


def test_a_running_runs_curve_holds_its_points_so_far_and_the_report_draws_it_unfinished(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bench import checkpoints
    from bench.cli import main
    from bench.report import build_report

    real, saved = checkpoints.save_torch, []

    def stop_at_the_second_checkpoint(obj, path):  # resnet8 finishes (one checkpoint); plain8 stops at its first
        real(obj, path)
        if "ckpt" in str(path):
            saved.append(path)
            if len(saved) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "save_torch", stop_at_the_second_checkpoint)
    res = CliRunner().invoke(main, SWEEP + ["--kinds", "resnet,plain", "--out", str(tmp_path)])
    assert res.exit_code == 130, res.output
    monkeypatch.setattr(checkpoints, "save_torch", real)
    runs, curves = records.load(tmp_path)
    assert runs["model"].tolist() == ["resnet8"]
    plain = curves[curves["run_id"].str.startswith("plain8")]
    assert plain["iteration"].tolist() == [2] and plain["test_err"].notna().all()  # its point so far, on disk
    rep = build_report(tmp_path, tmp_path / "rep", responses=False)
    assert "thin black: 1 run(s) not finished" in rep.figures["training_curves"]._suptitle.get_text()
    status = rep.tables["status"].set_index("model")["status"]
    assert status["plain8"].startswith("not finished")
    out = CliRunner().invoke(main, ["status", str(tmp_path)])
    assert "interrupted: 1" in out.output and "running: 0" in out.output, out.output  # at once, not 10 minutes later
    out = CliRunner().invoke(main, ["status", str(tmp_path), "--follow", "--every", "0.01"])
    assert out.exit_code == 0 and "interrupted: 1" in out.output  # nothing running: --follow ends at once
    empty = CliRunner().invoke(main, ["status", str(tmp_path / "rep")])
    assert empty.exit_code == 1 and "not a results folder" in empty.output


def test_tensorboard_event_files_hold_each_evaluation_points_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from click.testing import CliRunner
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bench.cli import main

    res = CliRunner().invoke(main, SWEEP + ["--kinds", "resnet", "--tensorboard", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    runs, curves = records.load(tmp_path)
    run_id = runs["run_id"].iloc[0]
    events = EventAccumulator(str(tmp_path / "tb" / run_id))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train_loss", "train_err", "val_err", "test_err", "lr", "img_per_s", "data_wait_s"}
    for tag in ("train_err", "test_err", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert got == [(i, pytest.approx(v, rel=1e-6)) for i, v in zip(curves["iteration"], curves[tag])], tag


@pytest.mark.slow  # worker processes
def test_on_the_cpu_a_sweep_trains_a_run_per_core_by_default(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from bench.cli import main
    from bench.launch import cpu_jobs
    from bench.specs import Execution

    monkeypatch.delenv("RESBENCH_JOBS")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cpu_jobs(Execution(device="cpu"), 6) == 2 and cpu_jobs(Execution(device="cpu"), 1) == 1
    assert cpu_jobs(Execution(device="cuda"), 6) is None
    monkeypatch.setenv("RESBENCH_JOBS", "3")
    assert cpu_jobs(Execution(device="cpu"), 6) == 3
    monkeypatch.delenv("RESBENCH_JOBS")
    res = CliRunner().invoke(main, SWEEP + ["--kinds", "plain,resnet", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "to train on cpu in 2 processes of 1 thread(s)" in res.output, res.output
    runs = records.load(tmp_path)[0]
    assert (runs["status"] == "ok").all() and (runs["cpu_threads"] == 1).all() and len(runs) == 2
