"""Data-parallel runs (bench.ddp) with real processes on the CPU (gloo): the update, the evaluation, the
records, a killed run resumed, a dead rank that ends its run without a hang."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import resnet
from bench import checkpoints, records
from bench.specs import Execution, RunSpec, recipe
from bench.sources import evaluate

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--dataset", "synthetic", "--models", "resnet", "--depths", "8", "--width", "0.25", "--batch-size", "32",
        "--train-size", "256", "--val-size", "64", "--test-size", "200", "--device", "cpu"]

_RANK = """
import os, sys, torch
import torch.distributed as dist
import torch.nn.functional as F
import resnet
from bench import ddp, data
from bench.specs import Execution
from bench.sources import evaluate

out = sys.argv[1]
place = ddp.init(cuda=False)
torch.manual_seed(0)
net = resnet.build("resnet8", width=0.25).double()
g = torch.Generator().manual_seed(1)
x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
half = slice(4 * place.rank, 4 * place.rank + 4)
step = torch.nn.parallel.DistributedDataParallel(net)
opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
F.cross_entropy(step(x[half]), y[half]).backward()
opt.step()
# the evaluation split over the ranks, of images of its own
test = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 10, (37,), generator=g)
ddp.sync_buffers(net)
state = {k: v.clone() for k, v in net.state_dict().items()}
err = evaluate(net.float(), test, labels, torch.zeros(3, 32, 32), Execution(eval_batch_size=5), torch.device("cpu"))
if place.main:
    torch.save(dict(state=state, err=err), out)
ddp.leave()
"""


def _ranks(script, args, world=2, timeout=120):
    from bench import ddp

    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    port = ddp.free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], env=os.environ | env | dict(
        RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
        for r in range(world)]
    assert [p.wait(timeout=timeout) for p in procs] == [0] * world


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_a_data_parallel_step_is_the_single_process_step_over_both_halves(tmp_path):
    """Two ranks, four images each: DDP averages their gradients. BatchNorm normalises each rank's four
    images (per-process BN, as in the paper's 8-GPU runs), so the same update in one process is the
    mean of the two halves' losses, each half through the net on its own (float64: exact to 1e-12).
    The evaluation, split over the ranks, counts each of the 37 images once: the single-process error."""
    _ranks(_RANK, [str(tmp_path / "rank0.pt")])
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    torch.manual_seed(0)
    net = resnet.build("resnet8", width=0.25).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (8,), generator=g)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss = (torch.nn.functional.cross_entropy(net(x[:4]), y[:4]) + torch.nn.functional.cross_entropy(net(x[4:]), y[4:])) / 2
    loss.backward()
    opt.step()
    for name, p in net.named_parameters():
        torch.testing.assert_close(got["state"][name], p.detach(), rtol=1e-12, atol=1e-12, msg=name)
    torch.manual_seed(0)
    start = resnet.build("resnet8", width=0.25).double().state_dict()
    assert max(float((got["state"][n] - start[n]).abs().max()) for n, _ in net.named_parameters()) > 1e-3
    test = torch.randint(0, 256, (37, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (37,), generator=g)
    net.load_state_dict(got["state"])
    alone = evaluate(net.float(), test, labels, torch.zeros(3, 32, 32), Execution(eval_batch_size=5),
                     torch.device("cpu"))
    assert got["err"] == alone and 0 < alone[0] < 1


def _sweep(out, *extra, background=False):
    cmd = [sys.executable, "-m", "bench", "sweep", "--procs-per-run", "2", *TINY, "--out", str(out), *extra]
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    if background:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_a_two_process_run_records_the_usual_schema_and_its_evaluation(tmp_path):
    res = _sweep(tmp_path / "ddp", "--iterations", "8", "--eval-every", "4")
    assert res.returncode == 0, res.stdout + res.stderr
    runs, curves = records.load(tmp_path / "ddp")
    alone = subprocess.run([sys.executable, "-m", "bench", "sweep", *TINY, "--iterations", "8", "--eval-every", "4",
                            "--out", str(tmp_path / "alone")], env=os.environ | {"PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr
    single = records.load(tmp_path / "alone")[0]
    assert set(single.columns) <= set(runs.columns) and len(runs) == 1 and curves["iteration"].tolist() == [4, 8]
    row = runs.iloc[0]
    assert (row["status"], row["world_size"], row["per_process_batch"], row["bn_mode"], row["bn_batch"]) == (
        "ok", 2, 16, "per process", 16)
    assert row["run_id"] != single.iloc[0]["run_id"]  # BN over 16 images is another experiment than over 32
    assert (single.iloc[0]["world_size"], single.iloc[0]["bn_mode"]) == (1, "whole batch")
    # the recorded test error is the saved weights' error on all 200 test images, each counted once
    saved = checkpoints.load_torch(records.paths(tmp_path / "ddp", row["run_id"])["weights"])
    spec = RunSpec.from_dict(saved["spec"])
    assert spec.bn_batch == 16
    net = resnet.build("resnet8", width=0.25)
    net.load_state_dict(saved["model"])
    from bench import data

    a = data.synthetic()
    parts = data.split(a, 64, 256)
    err = evaluate(net.to(memory_format=torch.channels_last), a.test_x[:200], a.test_y[:200],
                   data.pixel_mean(parts["train"][0]), Execution.for_device("cpu"), torch.device("cpu"))
    assert err == [row["final_test_err"]]
    assert not list((tmp_path / "ddp" / "claims").glob("*.json"))


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_a_killed_two_process_run_resumes_and_a_dead_rank_ends_its_run(tmp_path):
    out = tmp_path / "ddp"
    long = ["--iterations", "400", "--eval-every", "10"]
    first = _sweep(out, *long, background=True)
    spec_ckpt = out / "ckpt"
    deadline = time.time() + 120
    while time.time() < deadline and not list(spec_ckpt.glob("*.pt")):
        time.sleep(0.2)
    assert list(spec_ckpt.glob("*.pt")), first.stdout.read() if first.poll() is not None else "no checkpoint"
    os.killpg(first.pid, signal.SIGKILL)  # the launcher and both ranks, as a node failure would
    first.wait()
    assert records.load(out)[0].empty
    # resumed: a new sweep continues from rank 0's checkpoint; this time rank 1 dies under it
    second = _sweep(out, *long, background=True)
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None:
        victim = _rank_process(1, out)
        time.sleep(0.2)
    assert victim is not None
    time.sleep(2.0)
    t = time.time()
    os.kill(victim, signal.SIGKILL)
    text, _ = second.communicate(timeout=120)
    assert time.time() - t < 60, "the surviving rank hung"
    row = records.load(out)[0].iloc[0]
    # the launcher names the killed rank, also where rank 0 saw the closed connection and recorded first
    assert row["status"] == "failed" and "rank 1 of 2 was killed by SIGKILL (exited with code -9)" in row["error"], text
    third = _sweep(out, *long)
    assert third.returncode == 0, third.stdout + third.stderr
    row = records.load(out)[0].iloc[0]
    assert row["status"] == "ok" and 0 < row["resumed_from"] < 400 and row["iterations_done"] == 400


def test_the_rank_that_ended_a_run_is_one_killed_from_outside_before_one_that_raised_over_it():
    from bench.ddp import first_failure, signal_name

    assert first_failure([0, 0]) is None
    assert first_failure([1, None]) == (0, 1)  # the others were ended by the launcher: not theirs to answer for
    assert first_failure([None, 1, 1]) == (1, 1)
    assert first_failure([1, -9]) == (1, -9)  # rank 0 raised over the connection rank 1's death closed
    assert first_failure([None, -15, -9]) == (1, -15)
    assert (signal_name(-9), signal_name(-15), signal_name(1)) == ("SIGKILL", "SIGTERM", "")


def test_the_launcher_names_a_killed_rank_over_rank_0s_record_and_keeps_it_for_a_raise(tmp_path):
    from bench.sweep import _record_rank_failure
    from bench.train import record_failure

    spec, ex = RunSpec("resnet8", recipe("smoke")), Execution(device="cpu", world_size=2)
    seen = record_failure(spec, tmp_path, ex, RuntimeError("rank 0 of 2 failed first: Connection closed by peer"))
    assert _record_rank_failure(spec, tmp_path, ex, seen, 1, 1) is seen  # a raise: rank 0 named the first traceback
    killed = _record_rank_failure(spec, tmp_path, ex, seen, 1, -9)
    assert killed["error"].startswith("RuntimeError: rank 1 of 2 was killed by SIGKILL (exited with code -9)")
    assert records.recorded(tmp_path, spec.run_id)["error"] == killed["error"]
    lost = _record_rank_failure(spec, tmp_path, ex, None, 0, 1)  # rank 0 stopped before it recorded, no traceback
    assert lost["error"] == "RuntimeError: rank 0 of 2 exited with code 1 and the run has no record"
    quiet = _record_rank_failure(spec, tmp_path, ex, None, 0, 0)  # every rank ended well, yet no record
    assert quiet["error"] == "RuntimeError: rank 0 of 2 exited with code 0 and the run has no record"


def _rank_process(rank: int, out: Path) -> int | None:
    """The pid of the `bench worker` process of ``rank`` writing to ``out`` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in cmd and str(out).encode() in cmd and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def test_data_parallel_options_are_checked_before_anything_runs(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    base = ["sweep", *TINY, "--iterations", "2", "--out", str(tmp_path / "o")]
    for extra, message in ((["--procs-per-run", "3"], "does not split over 3 processes"),
                           (["--gpus-per-run", "2"], "--gpus-per-run above 1 needs GPUs"),
                           (["--procs-per-run", "2", "--sync-bn"], "--sync-bn needs CUDA"),
                           (["--procs-per-run", "2", "--fuse", "2"], "a data-parallel run trains alone"),
                           (["--nodes", "2"], "--nodes is for --executor slurm")):
        res = CliRunner().invoke(main, base + extra)
        assert res.exit_code == 2 and message in res.output, (extra, res.output)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="bn_batch must divide the batch of 32, got 5"):
        RunSpec("resnet8", recipe("smoke", batch_size=32), bn_batch=5)
    legacy = RunSpec("resnet8", recipe("smoke"))
    assert "bn_batch" not in legacy.identity()  # runs of earlier versions keep their run_ids
    assert RunSpec("resnet8", recipe("smoke"), bn_batch=32).run_id != legacy.run_id
    assert pd.isna(legacy.flat()["bn_batch"])


def test_each_process_of_a_data_parallel_run_gets_its_share_of_the_batch():
    from bench import data

    a = data.synthetic(n_train=100, n_test=10)
    x, y, mean = a.train_x, a.train_y, data.pixel_mean(a.train_x)
    cpu = torch.device("cpu")
    whole = data.DeviceLoader(x, y, mean, batch_size=8, seed=2, device=cpu)
    shares = [data.DeviceLoader(x, y, mean, batch_size=8, seed=2, device=cpu, rank=r, world=4) for r in range(4)]
    for it in (0, 11, 12, 30):  # 12 steps per epoch: 12 and 30 are in later epochs
        bx, by = whole.batch(it)
        parts = [s.batch(it) for s in shares]
        assert torch.equal(torch.cat([p[0] for p in parts]), bx) and torch.equal(torch.cat([p[1] for p in parts]), by)
        assert all(len(p[1]) == 2 for p in parts)
    with pytest.raises(ValueError, match="^the batch of 8 images does not split over 3 processes$"):
        data.DeviceLoader(x, y, mean, batch_size=8, seed=2, device=cpu, world=3)


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_each_attempt_of_a_data_parallel_run_records_its_own_failure(tmp_path):
    """Four attempts at one 2-process run: a bad file rank 1 reads, rank 1 killed from outside, a bad file rank 0
    reads (the first fixed), all fixed. Each record names this attempt's rank and cause, never an earlier
    attempt's; status says a run is being retried, with the last attempt's error; every rank that raised
    leaves its traceback. (status's "retrying" while a retry runs: tests/bench/test_records.py.)"""
    import io

    import numpy as np
    from PIL import Image

    from bench import imagefolder as imf

    root, rng = tmp_path / "tree", np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 1)):
        for c in range(10):
            folder = root / split / f"n0{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(buf, format="JPEG")
                (folder / f"{c}_{i}.JPEG").write_bytes(buf.getvalue())
    tree = imf.scan(root)
    items = imf.tree_sets(tree, recipe("imagenette"))["train"]
    imf.tree_mean(tree, items)  # the mean image made before the damage (rank 0 would meet the file there)

    def damage(epoch, position):  # the image at ``position`` of ``epoch``'s order (seed 0): batch of 8, 4 a rank
        path = Path(items.path(int(imf.epoch_order(len(items), 0, epoch)[position])))
        good = path.read_bytes()
        path.write_bytes(good[:300])
        return path, good

    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": str(ROOT), "RESBENCH_DDP_TIMEOUT": "60", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "bench", "sweep", "--preset", "imagenette", "--data-root", str(root), "--models",
            "resnet", "--depths", "18", "--width", "0.125", "--batch-size", "8", "--iterations", "40", "--eval-every",
            "1", "--loader-workers", "0", "--procs-per-run", "2", "--device", "cpu", "--out", str(out)]

    def row():
        return records.load(out)[0].iloc[0]

    def status():
        return subprocess.run([sys.executable, "-m", "bench", "status", str(out)], env=env, capture_output=True,
                              text=True).stdout

    # 1: rank 1's first image (batch 0 is order[:8], rank 1's half order[4:8]) is a truncated JPEG
    bad, good = damage(0, 4)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and row()["status"] == "failed", res.stdout + res.stderr
    assert "rank 1 of 2 failed first" in row()["error"] and str(bad) in row()["error"], row()["error"]
    assert "failed: 1" in status() and str(bad) in status()
    errors = sorted(p.name for p in (out / "errors").iterdir())
    assert f"{row()['run_id']}.rank1.err" in errors
    # 2: fixed; rank 1 killed from outside once the run has a checkpoint
    bad.write_bytes(good)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "ckpt").glob("*.pt")):
        time.sleep(0.05)
    pid = _rank_process(1, out)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    assert "rank 1 of 2 was killed by SIGKILL" in row()["error"] and str(bad) not in row()["error"], row()["error"]
    # 3: rank 0's first image of the step the run resumes at is bad (rank 1's is fine again)
    resume = int(checkpoints.load_torch(next((out / "ckpt").glob("*.pt")))["iteration"])
    bad0, good0 = damage(resume // 5, (resume % 5) * 8)  # 40 images of 8: 5 steps an epoch
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    error = row()["error"]
    assert "rank 0 of 2 failed first" in error and str(bad0) in error and "SIGKILL" not in error, error
    assert str(bad) not in error  # no earlier attempt's traceback is left to name attempt 1's file
    assert not any(str(bad) in f.read_text() for f in (out / "errors").glob("*.rank*.err"))
    # 4: all fixed: the run ends ok, resumed from its checkpoint, and status has nothing to retry
    bad0.write_bytes(good0)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and row()["status"] == "ok" and row()["resumed_from"] > 0, res.stdout + res.stderr
    assert "ok: 1" in status() and "retrying: 0" in status()


@pytest.mark.slow
def test_a_run_torchrun_started_resumes_under_resbenchs_own_launcher(tmp_path):
    out = tmp_path / "tr"
    common = ["--dataset", "synthetic", "--width", "0.25", "--batch-size", "16", "--train-size", "64", "--val-size",
              "32", "--test-size", "32", "--iterations", "400", "--eval-every", "20", "--device", "cpu", "--out", str(out)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                 "-m", "bench", "run", "resnet8", *common], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "ckpt").glob("*.pt")):
        time.sleep(0.05)
    os.killpg(torchrun.pid, signal.SIGTERM)  # torchrun and its two ranks: a preempted job
    torchrun.communicate(timeout=120)
    assert list((out / "ckpt").glob("*.pt")) and not (out / "runs").exists() or not list((out / "runs").iterdir())
    res = subprocess.run([sys.executable, "-m", "bench", "sweep", "--kinds", "resnet", "--depths", "8",
                          "--procs-per-run", "2", *common], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    row = records.load(out)[0].iloc[0]
    assert (row["status"], row["world_size"], row["bn_batch"]) == ("ok", 2, 8) and row["resumed_from"] > 0


_COLLECTIVE_BN = """
import sys
import torch
import torch.distributed as dist
from torch import nn
from bench import ddp
from bench.specs import Execution, RunSpec, recipe
from bench.train import run_group


class CollectiveBN(nn.BatchNorm2d):
    # a training forward that is a collective, as SyncBatchNorm's (which runs on GPUs only)
    def forward(self, x):
        if self.training and dist.is_initialized():
            dist.all_reduce(torch.ones(1))
        return super().forward(x)


def convert(module, process_group=None):
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CollectiveBN(child.num_features)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new)
        else:
            convert(child)
    return module


torch.nn.SyncBatchNorm.convert_sync_batchnorm = staticmethod(convert)
place = ddp.init(cuda=False)
r = recipe("smoke", batch_size=16, iterations=4, eval_every=2, train_size=64, val_size=32, test_size=32)
ex = Execution(device="cpu", world_size=2, sync_bn=True)  # --sync-bn itself refuses the CPU
rows = run_group([RunSpec("resnet8", r, width=0.25, dataset="synthetic")], sys.argv[1], ex, progress=False)
assert not place.main or rows[0]["status"] == "ok", rows
ddp.leave()
"""


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_with_synchronised_bn_every_rank_takes_part_in_the_signal_probe(tmp_path, monkeypatch):
    """At an evaluation point the backward-signal probe runs train-mode forwards; with SyncBatchNorm each is a
    collective, so every rank must run it (rank 0 alone would wait for partners that never come)."""
    monkeypatch.setenv("RESBENCH_DDP_TIMEOUT", "30")
    _ranks(_COLLECTIVE_BN, [str(tmp_path / "out")], timeout=120)
    signals = records.load_signals(tmp_path / "out")
    assert sorted(signals["iteration"].unique()) == [2, 4] and (signals["batches"] == 2).all()


_MEAN = """
import os, sys, torch
rank = int(os.environ["RANK"])
os.environ["RESBENCH_CACHE"] = os.path.join(sys.argv[2], f"node{rank}")  # each rank on a node of its own
from bench import ddp, imagefolder as imf
ddp.init(cuda=False)
tree = imf.scan(sys.argv[1])
mean = imf.tree_mean(tree, tree.train, workers=0)
torch.save(mean, os.path.join(sys.argv[2], f"mean{rank}.pt"))
ddp.leave()
"""


@pytest.mark.slow
def test_every_rank_gets_rank_0s_mean_image_though_its_nodes_cache_has_none(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / "tree" / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
                (tmp_path / "tree" / split / f"c{c}" / f"{i}.png").write_bytes(buf.getvalue())
    _ranks(_MEAN, [str(tmp_path / "tree"), str(tmp_path)])
    m0, m1 = (torch.load(tmp_path / f"mean{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(m0, m1) and m0.shape == (3, 224, 224)
    assert list((tmp_path / "node0").glob("mean-*.pt")) and not list((tmp_path / "node1").glob("mean-*.pt"))
