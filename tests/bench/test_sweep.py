"""The training engine end to end: real runs on tiny real data, records, resume, divergence, errors."""
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

import resnet
from bench import records
from bench.cli import main
from bench.specs import Execution, RunSpec, SweepSpec, recipe
from bench.sweep import pending, run_local
from bench.sources import evaluate
from bench.train import run_one
from bench import data

CPU = Execution.for_device("cpu")
TIMING = ["train_time_s", "img_per_s", "data_wait_s"]  # how fast, not what was learned


def test_real_cifar_run_writes_self_describing_records(tmp_path, cifar_root, tiny):
    spec = RunSpec("resnet8", tiny, seed=0, width=0.25, sweep="t")
    row = run_one(spec, tmp_path, CPU, data_root=cifar_root, progress=False)
    runs, curves = records.load(tmp_path)
    assert len(runs) == 1 and runs.loc[0, "run_id"] == spec.run_id and runs.loc[0, "status"] == "ok"
    r = runs.iloc[0]
    for col in ["sweep", "model", "family", "kind", "depth", "residual", "shortcut", "width", "dataset", "recipe",
                "batch_size", "lr", "momentum", "weight_decay", "iterations", "milestones", "seed", "params", "macs",
                "final_train_err", "final_val_err", "final_test_err", "best_val_err", "train_img_per_s",
                "step_time_ms", "wall_time_s", "peak_memory_bytes", "device", "gpu_name", "torch_version",
                "cuda_version", "cudnn_version", "resbench_version", "git_sha", "git_dirty", "utc_time", "amp"]:
        assert col in runs.columns, col
    assert "hostname" not in runs.columns and "host" not in runs.columns
    assert r["depth"] == 8 and r["kind"] == "resnet" and bool(r["residual"]) and r["dataset"] == "cifar10"
    assert r["params"] == resnet.count_params(resnet.build("resnet8", width=0.25))
    for c in ["final_train_err", "final_val_err", "final_test_err"]:
        assert 0 <= r[c] <= 1
    assert r["train_img_per_s"] > 0 and r["timed_windows"] == 1
    assert list(curves.columns) == records.CURVE_COLUMNS
    assert curves["iteration"].tolist() == [8, 16] and (curves["lr"] == tiny.lr).all()
    assert row["final_test_err"] == curves["test_err"].iloc[-1]
    # the saved final weights reproduce the recorded test error
    saved = torch.load(records.paths(tmp_path, spec.run_id)["weights"], weights_only=True)
    net = resnet.build("resnet8", width=0.25)
    net.load_state_dict(saved["model"])
    a = data.load("cifar10", cifar_root)
    parts = data.split(a, tiny.val_size, tiny.train_size)
    [err] = evaluate(net, a.test_x[:256], a.test_y[:256], data.pixel_mean(parts["train"][0]), CPU, torch.device("cpu"))
    assert err == pytest.approx(r["final_test_err"])
    assert not records.paths(tmp_path, spec.run_id)["ckpt"].exists()


def test_same_seed_gives_identical_curves_other_seed_differs(tmp_path, tiny):
    rows = []
    for out, seed in (("a", 1), ("b", 1), ("c", 2)):
        run_one(RunSpec("plain8", tiny, seed=seed, width=0.25, dataset="synthetic"), tmp_path / out, CPU, progress=False)
        rows.append(records.load(tmp_path / out)[1].drop(columns=TIMING + ["run_id"]))
    pd.testing.assert_frame_equal(rows[0], rows[1])
    assert not rows[0].equals(rows[2])


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path, tiny):
    bad = RunSpec("plain8", replace(tiny, lr=1e30), width=0.25, dataset="synthetic")
    good = RunSpec("resnet8", tiny, width=0.25, dataset="synthetic")
    run_local([bad, good], tmp_path, CPU, progress=False, log=lambda s: None)
    runs = records.load(tmp_path)[0].set_index("model")
    assert runs.loc["plain8", "status"] == "diverged" and runs.loc["plain8", "error"] == "non-finite training loss at iteration 8"
    assert runs.loc["resnet8", "status"] == "ok"
    # its records end at the point it diverged, its layer table is empty but has its columns
    curve = pd.read_parquet(records.paths(tmp_path, bad.run_id)["curves"])
    assert curve["iteration"].tolist() == [8] and curve[["val_err", "test_err"]].isna().all().all()
    layers = pd.read_parquet(records.paths(tmp_path, bad.run_id)["layers"])
    assert layers.empty and list(layers.columns) == records.LAYER_COLUMNS
    assert pending([bad, good], tmp_path) == []  # diverged counts as done


def test_failed_run_is_recorded_and_retried(tmp_path, tiny, monkeypatch):
    spec = RunSpec("resnet8", tiny, width=0.25, dataset="cifar10")
    monkeypatch.delenv("RESBENCH_DATA", raising=False)
    run_local([spec], tmp_path / "r", CPU, data_root=tmp_path / "nowhere", progress=False, log=lambda s: None)
    runs = records.load(tmp_path / "r")[0]
    assert runs.loc[0, "status"] == "failed" and "not found" in runs.loc[0, "error"]
    assert pending([spec], tmp_path / "r") == [spec]


SWEEP_ARGS = ["sweep", "--dataset", "synthetic", "--models", "plain,resnet", "--depths", "8", "--width", "0.25",
              "--batch-size", "32", "--train-size", "256", "--val-size", "64", "--test-size", "64", "--device", "cpu"]


def test_sweep_cli_skips_finished_runs(tmp_path):
    args = SWEEP_ARGS + ["--iterations", "8", "--eval-every", "4", "--out", str(tmp_path)]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "2 to train" in first.output and "plain8" in first.output and "ok" in first.output
    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    second = CliRunner().invoke(main, args)
    assert "2 already recorded, 0 to train" in second.output
    assert stamp == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    assert (tmp_path / "sweep.toml").read_text().count("depths = [8]") == 1


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_sweep_in_parallel_processes(tmp_path, monkeypatch):
    """Two slots, four runs: two worker processes, each training two runs (torch imported once a slot)."""
    started = []
    popen = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or popen(cmd, **kw))
    args = SWEEP_ARGS + ["--iterations", "4", "--eval-every", "4", "--seeds", "0,1", "--jobs", "2", "--out", str(tmp_path)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    runs, curves = records.load(tmp_path)
    assert sorted(runs["status"]) == ["ok"] * 4 and runs["run_id"].is_unique and len(curves) == 4
    assert len(started) == 2 and all(cmd[3] == "serve" for cmd in started)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_a_killed_worker_fails_its_run_and_the_slot_goes_on_in_a_fresh_process(tmp_path):
    """kill -9 of a parallel sweep's worker: its run is recorded failed with the signal's code, and the
    slot's next run trains in a new process; the sweep ends with exit 1 naming the failed run."""
    args = SWEEP_ARGS + ["--iterations", "200", "--eval-every", "20", "--models", "plain", "--batch-size", "64",
                         "--seeds", "0,1,2", "--jobs", "2", "--out", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-m", "bench", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any((tmp_path / "ckpt").glob("*.pt")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    victim = _children(proc.pid)[0]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    runs = records.load(tmp_path)[0].set_index("seed")
    assert sorted(runs["status"]) == ["failed", "ok", "ok"], runs["status"]
    assert runs.loc[runs["status"] == "failed", "error"].iloc[0] == "RuntimeError: worker exited with code -9"
    assert "1 run(s) failed" in err


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_kill_9_then_resume_loses_and_duplicates_nothing(tmp_path):
    """A really killed subprocess: the same command resumes from the checkpoint, curves as if never killed."""
    args = SWEEP_ARGS + ["--iterations", "120", "--eval-every", "20", "--models", "plain", "--batch-size", "64"]
    cmd = [sys.executable, "-m", "bench", *args, "--out", str(tmp_path / "killed")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "killed" / "ckpt"
    deadline = time.time() + 120
    while not (ckpt_dir.is_dir() and any(ckpt_dir.glob("*.pt"))) and time.time() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = torch.load(next(ckpt_dir.glob("*.pt")), weights_only=True)
    assert 0 < ck["iteration"] < 120
    assert not any((tmp_path / "killed" / "runs").glob("*.parquet"))
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ref = subprocess.run([sys.executable, "-m", "bench", *args, "--out", str(tmp_path / "ref")], capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    (k_runs, k_curves), (r_runs, r_curves) = records.load(tmp_path / "killed"), records.load(tmp_path / "ref")
    assert len(k_runs) == 1 and k_runs.loc[0, "status"] == "ok" and k_runs.loc[0, "resumed_from"] == ck["iteration"]
    assert r_runs.loc[0, "resumed_from"] == 0
    assert k_curves["iteration"].tolist() == list(range(20, 121, 20))
    pd.testing.assert_frame_equal(k_curves.drop(columns=TIMING), r_curves.drop(columns=TIMING))
    assert not any(ckpt_dir.glob("*.pt"))


@pytest.mark.parametrize("args,message", [
    (["run", "resnet21"], "CIFAR depths are 6n+2"),
    (["sweep", "--depths", "8,9"], "6n+2"),
    (["sweep", "--models", "vgg"], "unknown model kind"),
    (["sweep", "--depths", "eight"], "comma-separated"),
    (["sweep", "--device", "tpu"], "device must be"),
    (["sweep", "--iterations", "0"], "0 is not in the range x>=1"),
    (["sweep", "--jobs", "0"], "'--jobs': 0 is not in the range x>=1"),
    (["sweep", "--runs-per-gpu", "0"], "'--runs-per-gpu': 0 is not in the range x>=1"),
    (["sweep", "--seeds", "0,-1"], "every value must be >= 0, got -1"),
    (["run", "resnet8", "--seed", "-2"], "'--seed': -2 is not in the range x>=0"),
    (["sweep", "--width", "0"], "'--width': 0.0 is not in the range x>0"),
    (["sweep", "--width", "-0.5"], "is not in the range x>0"),
    (["sweep", "--val-size", "-1"], "'--val-size': -1 is not in the range x>=0"),
    (["sweep", "--lr", "0"], "'--lr': 0.0 is not in the range x>0"),
    (["sweep", "--max-parallel", "0"], "is not in the range x>=1"),
    (["profile", "--repeats", "0"], "'--repeats': 0 is not in the range x>=1"),
    (["profile", "--batch-sizes", "128,0"], "every value must be >= 1, got 0"),
])
def test_bad_options_give_clear_errors(tmp_path, args, message):
    res = CliRunner().invoke(main, args + ["--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and message in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "o" / "runs").exists()


def test_missing_data_fails_before_writing_anything(tmp_path, monkeypatch):
    monkeypatch.delenv("RESBENCH_DATA", raising=False)
    for cmd in (["run", "resnet8"], ["sweep"]):
        res = CliRunner().invoke(main, cmd + ["--data-root", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                              "--iterations", "2"])
        assert res.exit_code == 1 and "Traceback" not in res.output
        assert "cifar10 not found: looked under" in res.output and "--data-root" in res.output
        assert not (tmp_path / "o").exists()  # nothing written, not even the folder


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(main, ["sweep", "--dataset", "synthetic", "--out", str(blocker / "sub")])
    assert res.exit_code == 1 and "cannot write results" in res.output


def test_config_file(tmp_path):
    good = tmp_path / "s.toml"
    good.write_text('dataset = "synthetic"\ndepths = [8]\nmodels = "resnet"\nwidth = 0.25\niterations = 4\n'
                    'eval-every = 4\nbatch_size = 32\ntrain_size = 64\nval_size = 32\ntest_size = 32\ndevice = "cpu"\n')
    res = CliRunner().invoke(main, ["sweep", "--config", str(good), "--seeds", "3", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    runs = records.load(tmp_path / "o")[0]
    assert runs["model"].tolist() == ["resnet8"] and runs["seed"].tolist() == [3] and runs["iterations"].tolist() == [4]
    bad = tmp_path / "bad.toml"
    bad.write_text("depths = [8,\n")
    res = CliRunner().invoke(main, ["sweep", "--config", str(bad)])
    assert res.exit_code == 2 and "not valid TOML" in res.output
    bad.write_text("dpeths = [8]\n")
    res = CliRunner().invoke(main, ["sweep", "--config", str(bad)])
    assert res.exit_code == 2 and "unknown key(s) dpeths" in res.output


def test_sweep_grid_and_run_ids():
    sw = SweepSpec("x", recipe("smoke"), models=("plain", "resnet"), depths=(20, 50), seeds=(0, 1))
    names = [r.model for r in sw.runs()]
    assert names[:4] == ["plain20", "resnet20", "cifar_plain50", "cifar_resnet50"] and len(names) == 8
    ids = [r.run_id for r in sw.runs()]
    assert len(set(ids)) == 8 and ids == [r.run_id for r in sw.runs()]
    assert RunSpec("plain20", recipe("smoke"), sweep="a").run_id == RunSpec("plain20", recipe("smoke"), sweep="b").run_id
    assert RunSpec("plain20", recipe("smoke")).run_id != RunSpec("plain20", recipe("smoke", lr=0.2)).run_id


def test_he2015_recipe_is_the_paper():
    r = recipe("he2015")
    assert (r.batch_size, r.lr, r.momentum, r.weight_decay, r.iterations, r.milestones) == (128, 0.1, 0.9, 1e-4, 64_000, (32_000, 48_000))
    assert (r.val_size, r.train_size) == (5_000, None)
    assert [r.lr_at(i, 56) for i in (0, 31_999, 32_000, 47_999, 48_000, 63_999)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert [r.lr_at(i, 110) for i in (0, 399, 400, 32_000)] == pytest.approx([0.01, 0.01, 0.1, 0.01])


def test_sweep_with_failed_runs_exits_nonzero_and_keeps_going(tmp_path):
    # 20k validation images out of synthetic's 10k: every run raises inside training
    args = SWEEP_ARGS + ["--iterations", "4", "--eval-every", "4", "--val-size", "20000", "--out", str(tmp_path)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "2 run(s) failed" in res.output
    runs = records.load(tmp_path)[0]
    assert list(runs["status"]) == ["failed", "failed"] and runs["error"].str.contains("leaves no training").all()


def test_extending_a_sweep_keeps_the_union_of_its_grids(tmp_path):
    from bench.sweep import read_sweep_toml, status

    base = SWEEP_ARGS + ["--iterations", "4", "--eval-every", "4", "--out", str(tmp_path)]
    assert CliRunner().invoke(main, base + ["--seeds", "0"]).exit_code == 0
    assert CliRunner().invoke(main, base + ["--seeds", "1", "--depths", "14", "--models", "resnet"]).exit_code == 0
    spec = read_sweep_toml(tmp_path)
    assert (spec.seeds, spec.depths, spec.models) == ((0, 1), (8, 14), ("plain", "resnet"))
    st = status(tmp_path)
    assert len(st) == 8 and (st["status"] == "ok").sum() == 3 and (st["status"] == "pending").sum() == 5
    before = (tmp_path / "sweep.toml").read_text()
    other = CliRunner().invoke(main, SWEEP_ARGS + ["--iterations", "8", "--eval-every", "4", "--out", str(tmp_path)])
    assert other.exit_code == 1 and "other settings (recipe.iterations: 4 recorded, 8 asked for)" in other.output and "another --out" in other.output
    assert (tmp_path / "sweep.toml").read_text() == before and len(records.load(tmp_path)[0]) == 3
