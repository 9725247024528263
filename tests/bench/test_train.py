"""The trainer's science against hand-computed values: the learning rate the optimizer really uses,
SGD's update, error and loss counting, evaluation over several batches, the run's summary, what a
resumed run reports, and its memory peak.

Each test is named after the mistake it catches; plant that mistake and it fails.
"""
import io
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import resnet

from bench import checkpoints, claims, data, env, records, sources, train
from bench.specs import Execution, RunSpec, recipe
from bench.steps import TrainStep, current_lr, load_optimizer_state, make_optimizer, set_lr
from bench.sources import evaluate
from bench.train import run_one, timed_windows

CPU = Execution.for_device("cpu")
cpu = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class FirstValues(nn.Module):
    """Logits = the first three input values times a weight of 1: predictions worked out by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.flatten(1)[:, :3] * self.w


def _spy_steps(monkeypatch) -> list[dict]:
    """Record the optimizer's hyper-parameters as each training step is taken."""
    seen = []
    real = TrainStep.__call__

    def spy(self, x, y):
        g = self.opt.param_groups[0]
        seen.append(dict(lr=float(g["lr"]), momentum=g["momentum"], weight_decay=g["weight_decay"], batch=len(y)))
        return real(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    return seen


@pytest.mark.parametrize("warmup_min_depth,warmed", [(8, True), (14, False)])
def test_the_optimizer_really_follows_the_schedule(tmp_path, monkeypatch, warmup_min_depth, warmed):
    """Milestones and the deep-net warm-up reach the optimizer at the right steps (not only the records)."""
    r = recipe("smoke", batch_size=16, lr=0.2, lr_decay=0.5, milestones=(4, 7), iterations=10, eval_every=5,
               warmup_lr=0.03, warmup_iters=2, warmup_min_depth=warmup_min_depth, momentum=0.8,
               weight_decay=5e-4, train_size=64, val_size=32, test_size=32)
    seen = _spy_steps(monkeypatch)
    run_one(RunSpec("plain8", r, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    first = [0.03, 0.03] if warmed else [0.2, 0.2]
    assert [s["lr"] for s in seen] == pytest.approx(first + [0.2, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])
    assert {(s["momentum"], s["weight_decay"], s["batch"]) for s in seen} == {(0.8, 5e-4, 16)}
    # the recorded lr is the optimizer's, for the last step before each evaluation point
    assert records.load(tmp_path)[1]["lr"].tolist() == pytest.approx([0.1, 0.05])


def test_sgd_update_matches_hand_computation():
    """Momentum 0.9 and weight decay 0.1 on every parameter (BN's too), lr 0.2 then 0.1."""
    net = nn.Sequential(nn.Linear(1, 2, bias=False), nn.BatchNorm1d(2))
    opt = make_optimizer(net, 0.2, 0.9, 0.1, cpu)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters())) == 3
    p = net[0].weight
    with torch.no_grad():
        p.copy_(torch.tensor([[1.0], [-2.0]]))
    for lr in (0.2, 0.1):
        set_lr(opt, lr)
        assert current_lr(opt) == lr
        p.grad = torch.full_like(p, 0.5)
        opt.step()
    # step 1: d = g + wd p = (0.6, 0.3) = buf; p = (0.88, -2.06)
    # step 2: d = (0.588, 0.294); buf = 0.9 (0.6, 0.3) + d = (1.128, 0.564); p -= 0.1 buf
    assert p.detach().flatten().tolist() == pytest.approx([0.7672, -2.1164])


def _ce(row, label):
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_training_step_counts_wrong_answers_and_weights_loss_by_batch():
    model = FirstValues()
    step = TrainStep(model, make_optimizer(model, 0.0, 0.9, 0.0, cpu))  # lr 0: the logits stay as written
    b1 = ([[3, 1, 0], [0, 2, 1], [0, 0, 5], [1, 4, 0]], [0, 1, 2, 0])  # predictions 0 1 2 1: one wrong
    b2 = ([[2, 0, 1], [0, 1, 3]], [1, 2])  # predictions 0 2: one wrong
    for x, y in (b1, b2):
        step(torch.tensor(x, dtype=torch.float32)[:, :, None, None], torch.tensor(y))
    loss, err, n = step.read()
    assert n == 6 and err == pytest.approx(2 / 6)
    expect = sum(_ce(r, lab) for x, y in (b1, b2) for r, lab in zip(x, y)) / 6
    assert loss == pytest.approx(expect, rel=1e-6)
    again = step.read()  # read() starts a new window
    assert again[2] == 0 and math.isnan(again[0]) and math.isnan(again[1])
    pair = TrainStep(model, make_optimizer(model, 0.0, 0.9, 0.0, cpu), members=2)
    losses, errors, n = pair.read_members()  # nothing seen yet: unknown, per member
    assert n == 0 and len(losses) == len(errors) == 2 and all(map(math.isnan, losses + errors))
    with pytest.raises(ValueError, match=r"^a group's step has one loss per member: use read_members\(\)$"):
        pair.read()


def test_evaluate_compares_every_batch_with_its_own_labels():
    """Seven images in batches of 3, 3 and 1; two are misclassified, one of them in the last batch."""
    values = [[10, 0, 0], [0, 10, 0], [0, 0, 10], [0, 0, 10], [10, 0, 0], [0, 10, 0], [0, 0, 10]]  # argmax = prediction
    labels = [0, 1, 2, 2, 1, 1, 0]  # wrong: images 4 and 6
    x = torch.tensor(values, dtype=torch.uint8)[:, :, None, None]
    model = FirstValues()
    model.train()
    ex = Execution(eval_batch_size=3)
    [err] = evaluate(model, x, torch.tensor(labels), torch.zeros(3, 1, 1), ex, cpu)
    assert err == pytest.approx(2 / 7)
    assert model.training  # evaluation puts the net back into training mode
    assert math.isnan(evaluate(model, x[:0], torch.tensor([]), torch.zeros(3, 1, 1), ex, cpu)[0])


def test_run_summary_is_taken_from_its_curves(tmp_path, tiny):
    r = replace(tiny, iterations=20, eval_every=8)  # the last point falls between two multiples
    row = run_one(RunSpec("resnet8", r, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    c = records.load(tmp_path)[1]
    assert len(c) == 3 and row["iterations_done"] == 20
    assert row["final_train_loss"] == c["train_loss"].iloc[-1] and row["final_train_err"] == c["train_err"].iloc[-1]
    assert row["final_val_err"] == c["val_err"].iloc[-1] and row["final_test_err"] == c["test_err"].iloc[-1]
    assert row["best_train_err"] == c["train_err"].min() and row["best_val_err"] == c["val_err"].min()
    assert row["best_test_err"] == c["test_err"].min()
    assert row["test_err_at_best_val"] == c.loc[c["val_err"].idxmin(), "test_err"]
    assert row["train_time_s"] == c["train_time_s"].iloc[-1] and row["wall_time_s"] >= row["train_time_s"]
    assert row["train_img_per_s"] == pytest.approx(float(np.median(c["img_per_s"].iloc[1:])))
    assert row["step_time_ms"] == pytest.approx(1e3 * float(np.median(r.batch_size / c["img_per_s"].iloc[1:])))  # per window: s/step
    assert row["timed_windows"] == 2 and c["epoch"].tolist() == pytest.approx([i * 32 / 256 for i in (8, 16, 20)])


def test_a_diverged_runs_last_curve_row_keeps_what_was_read(tmp_path, tiny, monkeypatch):
    real = TrainStep.read_members

    def infinite_loss(self):
        losses, errs, seen = real(self)
        return [float("inf")], errs, seen

    monkeypatch.setattr(TrainStep, "read_members", infinite_loss)
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    row = run_one(spec, tmp_path, CPU, progress=False)
    (point,) = records.load(tmp_path)[1].itertuples()  # the first evaluation point, where it diverged
    assert row["status"] == "diverged" and (point.run_id, point.iteration) == (spec.run_id, 8)
    assert point.train_loss == float("inf") and 0 <= point.train_err <= 1  # as read, not made NaN
    assert math.isnan(point.val_err) and math.isnan(point.test_err)  # not evaluated
    assert point.train_time_s == row["train_time_s"] > 0 and point.img_per_s > 0


def test_training_on_all_images_still_reports_test_error(tmp_path, tiny):
    """--val-size 0 (train on all 50k): no validation error, but the test error is still summarised."""
    row = run_one(RunSpec("resnet8", replace(tiny, val_size=0), width=0.25, dataset="synthetic"), tmp_path, CPU,
                  progress=False)
    c = records.load(tmp_path)[1]
    assert c["val_err"].isna().all() and c["test_err"].notna().all()
    assert row["final_test_err"] == c["test_err"].iloc[-1] and row["best_test_err"] == c["test_err"].min()
    assert math.isnan(row["final_val_err"]) and math.isnan(row["best_val_err"]) and math.isnan(row["test_err_at_best_val"])


def test_an_interrupted_run_closes_its_progress_bar_and_its_loader(tmp_path, tiny, interrupt, monkeypatch):
    """Ctrl-C mid-run: the bar leaves the terminal, and a loader's processes (ImageNet-style data) stop."""
    closed = []
    monkeypatch.setattr(train.Progress, "close", lambda self: closed.append("bar"))
    monkeypatch.setattr(data.DeviceLoader, "close", lambda self: closed.append("loader"))
    interrupt(RunSpec("resnet8", tiny, seed=0, width=0.25, dataset="synthetic"), tmp_path, CPU)
    assert closed == ["bar", "loader"]


def test_resumed_run_times_only_its_own_attempt_without_its_warmup(tmp_path, tiny, interrupt):
    """Attempt 0 wrote window 1; attempt 1 (a new process, maybe another execution) wrote 2, 3 and 4,
    of which 2 holds its warm-up: the throughput is the median of windows 3 and 4."""
    spec = RunSpec("plain8", replace(tiny, iterations=32, eval_every=8), width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path, CPU)
    row = run_one(spec, tmp_path, CPU, progress=False)
    c = records.load(tmp_path)[1]
    assert row["resumed_from"] == 8 and row["timed_windows"] == 2
    assert row["train_img_per_s"] == pytest.approx(float(np.median(c["img_per_s"].iloc[2:])))


def test_a_fresh_runs_wall_clock_spans_its_first_to_last_reading(tmp_path, tiny, monkeypatch):
    readings, beats = [], []

    def clock():  # each reading one second after the last
        readings.append(1000.0 + len(readings))
        return readings[-1]

    real_beat = claims.Claim.beat
    monkeypatch.setattr(claims.Claim, "beat", lambda self, interval_s: beats.append(interval_s) or real_beat(self, interval_s))
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=clock))
    row = run_one(RunSpec("plain8", tiny, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    span = readings[-1] - readings[0]
    assert row["wall_time_s"] == span and row["train_time_s"] < span
    assert len(beats) == 3 and min(beats) > 0 and sum(beats) <= span  # each heartbeat: the time since the last one


def test_each_attempt_of_a_twice_resumed_run_is_its_own(tmp_path, tiny, interrupt):
    """Attempt 0 wrote window 1, attempt 1 window 2, attempt 2 windows 3 and 4: only window 4 is timed.
    The wall clock runs on over the attempts."""
    spec = RunSpec("plain8", replace(tiny, iterations=32, eval_every=8), width=0.25, dataset="synthetic")
    t = time.perf_counter()
    interrupt(spec, tmp_path, CPU)
    interrupt(spec, tmp_path, CPU)  # resumed at 8, stopped again at its checkpoint at 16
    before = time.perf_counter() - t
    ck = torch.load(records.paths(tmp_path, spec.run_id)["ckpt"], weights_only=True)
    assert [w["attempt"] for w in ck["windows"]] == [0, 1] and 0 < ck["wall_s"] < before
    t = time.perf_counter()
    row = run_one(spec, tmp_path, CPU, progress=False)
    elapsed = time.perf_counter() - t
    c = records.load(tmp_path)[1]
    assert row["resumed_from"] == 16 and row["timed_windows"] == 1 and row["train_img_per_s"] == c["img_per_s"].iloc[3]
    assert c["train_time_s"].is_monotonic_increasing and row["train_time_s"] == c["train_time_s"].iloc[-1]
    trained_now = row["train_time_s"] - ck["curves"][-1]["train_time_s"]
    assert ck["wall_s"] + trained_now <= row["wall_time_s"] <= ck["wall_s"] + elapsed


def test_a_checkpoint_of_an_earlier_version_resumes(tmp_path, tiny, interrupt):
    """Before layer rows and attempts existed, checkpoints had no "layers" and windows without "attempt"."""
    spec = RunSpec("plain8", replace(tiny, iterations=32, eval_every=8), width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path, CPU)
    path = records.paths(tmp_path, spec.run_id)["ckpt"]
    ck = torch.load(path, weights_only=True)
    del ck["layers"]
    ck["windows"] = [{k: v for k, v in w.items() if k != "attempt"} for w in ck["windows"]]
    torch.save(ck, path)
    row = run_one(spec, tmp_path, CPU, progress=False)
    assert row["status"] == "ok" and row["resumed_from"] == 8 and row["timed_windows"] == 2
    layers = pd.read_parquet(records.paths(tmp_path, spec.run_id)["layers"])
    assert sorted(set(layers["iteration"])) == [16, 24, 32]  # the first attempt's rows were never saved


def test_timed_windows_rule():
    w = lambda a, s: dict(attempt=a, steps=10, seconds=s, img_per_s=1 / s)  # noqa: E731
    assert timed_windows([w(0, 1), w(0, 2), w(0, 3)], 0) == [w(0, 2), w(0, 3)]
    assert timed_windows([w(0, 1), w(0, 2), w(1, 5)], 1) == [w(1, 5)]  # only one window: keep it
    old = [dict(steps=1, seconds=1.0, img_per_s=1.0), dict(steps=1, seconds=2.0, img_per_s=0.5)]  # before attempts
    assert timed_windows(old, 0) == old[1:] and timed_windows(old + [w(1, 4), w(1, 6)], 1) == [w(1, 6)]


def _rss_peak() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def test_cpu_peak_memory_is_the_runs_own(tmp_path, tiny):
    """A 600 MB spike before the run (an earlier run of the sweep, say) is not this run's peak."""
    spike = np.ones(600 * 2**20 // 8)
    del spike
    lifetime = _rss_peak()
    row = run_one(RunSpec("plain8", tiny, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    assert 0 < row["peak_memory_bytes"] < lifetime - 300 * 2**20


def test_checkpoint_learning_rate_keeps_the_optimizers_form():
    """A CPU checkpoint (float lr) loaded into a graph-captured optimizer (lr in a tensor) keeps that
    tensor: the graph reads it, so the next milestone must change it in place."""
    net = nn.Linear(2, 2)
    cpu_opt = make_optimizer(net, 0.1, 0.9, 1e-4, cpu)
    net(torch.ones(1, 2)).sum().backward()
    cpu_opt.step()
    set_lr(cpu_opt, 0.05)
    state = cpu_opt.state_dict()
    lr = torch.tensor(0.3)
    tensor_opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    load_optimizer_state(tensor_opt, state)
    assert tensor_opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.05)
    assert torch.equal(tensor_opt.state[net.weight]["momentum_buffer"], cpu_opt.state[net.weight]["momentum_buffer"])
    set_lr(tensor_opt, 0.005)
    assert lr.item() == pytest.approx(0.005)
    # and back: a checkpoint with a tensor lr resumed where the optimizer holds a float
    other = make_optimizer(net, 0.1, 0.9, 1e-4, cpu)
    load_optimizer_state(other, tensor_opt.state_dict())
    assert type(other.param_groups[0]["lr"]) is float and current_lr(other) == pytest.approx(0.005)


def test_a_checkpoint_keeps_the_live_optimizers_implementation_flags():
    """A CPU checkpoint (foreach SGD) resumed where the optimizer is fused SGD with a tensor lr, as
    make_optimizer builds it on CUDA: foreach would read the lr tensor with .item(), which fails
    under CUDA graph capture and syncs every eager step. Only momentum and hyper-parameters load."""
    net = nn.Linear(2, 2)
    cpu_opt = make_optimizer(net, 0.1, 0.9, 1e-4, cpu)
    net(torch.ones(1, 2)).sum().backward()
    cpu_opt.step()
    assert cpu_opt.param_groups[0]["foreach"] is True
    live = torch.optim.SGD(net.parameters(), lr=torch.tensor(0.3), momentum=0.5, weight_decay=0.0, fused=True)
    load_optimizer_state(live, cpu_opt.state_dict())
    g = live.param_groups[0]
    assert (g["fused"], g["foreach"]) == (True, None)  # the live flags
    assert (g["momentum"], g["weight_decay"], float(g["lr"])) == (0.9, 1e-4, pytest.approx(0.1))  # the checkpoint's
    plain = torch.optim.SGD(net.parameters(), lr=0.3, foreach=False)
    load_optimizer_state(plain, cpu_opt.state_dict())
    assert (plain.param_groups[0]["foreach"], plain.param_groups[0]["fused"]) == (False, None)


def test_checkpoint_holds_the_random_state(tmp_path, tiny, interrupt):
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path, CPU)
    ck = torch.load(records.paths(tmp_path, spec.run_id)["ckpt"], weights_only=True)
    assert set(ck["rng"]) == {"torch"}  # on the CPU; a CUDA run adds its device's generator
    assert ck["rng"]["torch"].dtype == torch.uint8 and ck["iteration"] == tiny.eval_every


def test_a_checkpoint_at_every_evaluation_point_but_the_last(tmp_path, tiny, monkeypatch):
    saved, real = [], checkpoints.save_torch
    monkeypatch.setattr(checkpoints, "save_torch", lambda obj, path: saved.append((path.parent.name, obj.get("iteration")))
                        or real(obj, path))
    spec = RunSpec("plain8", replace(tiny, iterations=17), width=0.25, dataset="synthetic")  # points 8, 16, 17
    run_one(spec, tmp_path, CPU, progress=False)
    assert saved == [("ckpt", 8), ("ckpt", 16), ("weights", None)]  # the finished run's weights replace them
    assert not records.paths(tmp_path, spec.run_id)["ckpt"].exists()


def test_a_cuda_device_adds_its_generator_to_the_saved_random_state(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(device) or torch.arange(3))
    state = train._rng_state(torch.device("cuda", 1))  # the generator of the device that trains, not device 0's
    assert torch.equal(state["cuda"], torch.arange(3)) and asked == [torch.device("cuda", 1)]
    assert torch.equal(state["torch"], torch.get_rng_state()) and train._rng_state(cpu).keys() == {"torch"}


@pytest.mark.gpu
@needs_cuda
def test_cpu_checkpoint_resumed_on_cuda_keeps_following_the_schedule(tmp_path, interrupt, monkeypatch):
    r = recipe("smoke", batch_size=32, iterations=16, eval_every=4, milestones=(8, 12), train_size=256, val_size=64,
               test_size=64)
    spec = RunSpec("resnet8", r, width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path, CPU)  # checkpoint written on the CPU at iteration 4: float lr
    seen = []
    real = TrainStep.__call__

    def spy(self, x, y):
        real(self, x, y)
        lr = self.opt.param_groups[0]["lr"]
        seen.append((id(lr), isinstance(lr, torch.Tensor) and lr.is_cuda, float(lr)))

    monkeypatch.setattr(TrainStep, "__call__", spy)
    ex = Execution.for_device("cuda", execution="cudagraph")
    run_one(spec, tmp_path, ex, progress=False)
    assert len({s[0] for s in seen}) == 1 and all(s[1] for s in seen)  # the one tensor the graph captured
    assert [s[2] for s in seen] == pytest.approx([0.05] * 4 + [0.005] * 4 + [0.0005] * 4)


@pytest.mark.gpu
@needs_cuda
def test_cuda_checkpoint_holds_the_cuda_random_state(tmp_path, tiny, interrupt):
    spec = RunSpec("resnet8", tiny, width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path, Execution.for_device("cuda"))
    ck = torch.load(records.paths(tmp_path, spec.run_id)["ckpt"], weights_only=True)
    assert set(ck["rng"]) == {"torch", "cuda"}



def test_cpu_peak_memory_reads_vmhwm_in_bytes():
    from bench.steps import peak_memory, reset_peak_memory

    assert reset_peak_memory(cpu) is True
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    rss = int(fields["VmRSS"].split()[0]) * 1024  # kB in /proc
    peak = peak_memory(cpu)
    assert peak == _rss_peak() and peak >= rss > 50 * 2**20  # a process with torch loaded holds > 50 MiB


def test_on_cuda_the_clock_and_memory_helpers_ask_the_training_device(monkeypatch):
    """The CUDA calls faked: each helper asks the device that trains (device 1 here), not device 0."""
    from bench.steps import peak_memory, reset_peak_memory, sync

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: calls.append(("synchronize", device)))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(("reset", device)))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: calls.append(("peak", device)) or 12345)
    gpu = torch.device("cuda", 1)
    sync(gpu)
    assert reset_peak_memory(gpu) is True and peak_memory(gpu) == 12345
    assert calls == [("synchronize", gpu), ("reset", gpu), ("peak", gpu)]
    sync(cpu)  # a no-op on the CPU
    assert peak_memory(cpu) > 12345 and len(calls) == 3


def test_peak_memory_is_unknown_where_it_cannot_be_reset(monkeypatch, tmp_path, tiny):
    """Without /proc/self/clear_refs the lifetime peak would be misleading: the row says nothing instead."""
    import builtins

    from bench.steps import reset_peak_memory

    real_open = builtins.open

    def no_clear_refs(path, *args, **kwargs):
        if str(path) == "/proc/self/clear_refs":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_clear_refs)
    assert reset_peak_memory(cpu) is False
    row = run_one(RunSpec("plain8", tiny, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    assert row["peak_memory_bytes"] is None


@pytest.mark.parametrize("amp", [True, False, None])
def test_the_training_step_runs_in_bf16_exactly_when_asked(amp):
    """bf16 autocast reaches the convolutions (and only when asked: not by default); parameters stay fp32."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    net(torch.zeros(1, 3, 8, 8))
    seen = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    step = TrainStep(net, make_optimizer(net, 0.1, 0.9, 0.0, cpu), **({} if amp is None else {"amp": amp}))
    step(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    assert seen == [torch.bfloat16 if amp else torch.float32]
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_layer_rows_for_every_weighted_layer_and_evaluation_point(tmp_path, tiny, interrupt):
    spec = RunSpec("resnet8", tiny, width=0.25, dataset="synthetic")
    run_one(spec, tmp_path / "ref", CPU, progress=False)
    layers = pd.read_parquet(records.paths(tmp_path / "ref", spec.run_id)["layers"])
    assert list(layers.columns) == records.LAYER_COLUMNS
    names = [n for n, m in resnet.build("resnet8").named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(names) == 8  # the stem, 2 convs in each of 3 blocks, the head
    assert layers.groupby("iteration")["layer_name"].apply(list).to_dict() == {8: names, 16: names}
    assert (layers["grad_norm"] > 0).all() and (layers["update_ratio"] > 0).all() and layers.notna().all().all()
    # the last rows describe the final weights, by hand
    w = torch.load(records.paths(tmp_path / "ref", spec.run_id)["weights"], weights_only=True)["model"]
    last = layers[layers["iteration"] == 16].set_index("layer_name")["weight_norm"]
    for name in names:
        assert last[name] == pytest.approx(float(w[f"{name}.weight"].norm()), rel=1e-6)
    # a resumed run keeps the rows of its first attempt
    interrupt(spec, tmp_path / "cut", CPU)
    run_one(spec, tmp_path / "cut", CPU, progress=False)
    pd.testing.assert_frame_equal(pd.read_parquet(records.paths(tmp_path / "cut", spec.run_id)["layers"]), layers)


def test_training_step_refuses_unknown_or_impossible_executions():
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^execution must be one of eager, compile, cudagraph, got 'jit'$"):
        TrainStep(net, make_optimizer(net, 0.1, 0.9, 0.0, cpu), execution="jit")
    with pytest.raises(ValueError, match=r"^execution 'cudagraph' needs a CUDA device; use eager or compile on the CPU$"):
        TrainStep(net, make_optimizer(net, 0.1, 0.9, 0.0, cpu), execution="cudagraph")


def test_compile_execution_wraps_the_model_and_eager_does_not():
    net = nn.Linear(2, 2)
    opt = make_optimizer(net, 0.1, 0.9, 0.0, cpu)
    assert TrainStep(net, opt).forward is net
    compiled = TrainStep(net, opt, execution="compile").forward  # compiled lazily, at its first call
    assert compiled is not net and getattr(compiled, "_orig_mod", None) is net


def test_a_failed_run_records_its_error_text_whole(tmp_path, tiny):
    from bench.train import record_failure

    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    err = RuntimeError("CUDA out of memory")
    err.add_note("while training plain8")  # a note travels as a second line
    row = record_failure(spec, tmp_path, Execution.for_device("cpu"), err)
    assert row["error"] == "RuntimeError: CUDA out of memory\nwhile training plain8" and row["status"] == "failed"
    assert records.recorded(tmp_path, spec.run_id)["error"] == row["error"]


class PairLogits(nn.Module):
    """Two members' logits, each its own parameter row: (B, 2, 3)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2, 3))

    def forward(self, x):
        return self.w.expand(len(x), 2, 3)


def test_a_masked_member_takes_no_step_and_the_other_its_own():
    model = PairLogits()
    step = TrainStep(model, make_optimizer(model, 1.0, 0.0, 0.0, cpu), members=2)
    step.mask(1)  # member 1 diverged
    step(torch.zeros(2, 1), torch.tensor([[0, 1], [0, 1]]))
    # member 0: the gradient of its mean cross-entropy at uniform logits, label 0: (1/3 - 1, 1/3, 1/3)
    assert torch.allclose(model.w[0], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    assert torch.equal(model.w[1], torch.zeros(3))
    losses, errors, n = step.read_members()  # both are still measured
    assert n == 2 and losses == pytest.approx([math.log(3)] * 2) and errors == [0.0, 1.0]


def _curve(it, loss, train, val, test):
    return dict(run_id="r", iteration=it, epoch=it / 10, lr=0.1, train_loss=loss, train_err=train, val_err=val,
                test_err=test, train_time_s=it / 100, img_per_s=1.0)


def test_run_row_summary_and_columns_by_hand():
    """Every summary column of a run's row from hand-made curves and timing windows."""
    from bench.train import _row

    spec = RunSpec("plain8", recipe("smoke"), seed=2, width=0.5, dataset="synthetic", sweep="s")
    curves = [_curve(100, 2.0, 0.6, 0.5, 0.52), _curve(200, 1.5, 0.4, 0.3, 0.33), _curve(300, 1.2, 0.45, 0.35, 0.31),
              _curve(400, float("nan"), 0.9, float("nan"), float("nan"))]  # the point it diverged at
    timed = [dict(img_per_s=100.0, group_size=3, seconds=1.0, steps=10),
             dict(img_per_s=150.0, group_size=1, seconds=3.0, steps=10),
             dict(img_per_s=120.0, seconds=2.0, steps=4)]  # a window of an earlier version: no group size
    # the trainer's data object (bench.sources.Streamed here): where the data came from, how batches were made
    source = SimpleNamespace(source="/data/x.tar.gz", sha256="abc", official=False, loader="stream-loader",
                             decode_on="device")
    ex = Execution("cpu", amp=True, channels_last=True, execution="compile", cudnn_benchmark=True)
    kw = dict(params=7, macs=11, status="diverged", error="boom", start=100, train_time=3.5, wall=9.0, ex=ex,
              source=source, group_id="g1", group_size=3, peak=12345)
    row = _row(spec, curves, timed, **kw)
    assert {k: row[k] for k in ("iterations_done", "resumed_from", "final_train_err", "final_val_err",
                                "final_test_err", "best_train_err", "best_val_err", "test_err_at_best_val",
                                "best_test_err", "train_img_per_s", "group_img_per_s", "timed_windows")} == dict(
        iterations_done=400, resumed_from=100, final_train_err=0.9, final_val_err=0.35, final_test_err=0.31,
        best_train_err=0.4, best_val_err=0.3, test_err_at_best_val=0.33, best_test_err=0.31,
        train_img_per_s=120.0, group_img_per_s=150.0, timed_windows=3)  # group: median of 300, 150, 120
    assert math.isnan(row["final_train_loss"]) and row["step_time_ms"] == pytest.approx(300.0)
    assert {k: row[k] for k in ("params", "macs", "status", "error", "train_time_s", "wall_time_s",
                                "peak_memory_bytes", "amp", "channels_last", "execution", "cudnn_benchmark",
                                "train_path", "group_size", "group_id", "data_source", "data_sha256",
                                "data_official", "device", "decode_on")} == dict(
        params=7, macs=11, status="diverged", error="boom", train_time_s=3.5, wall_time_s=9.0, peak_memory_bytes=12345,
        amp=True, channels_last=True, execution="compile", cudnn_benchmark=True, train_path="stream-loader+compile",
        group_size=3, group_id="g1", data_source="/data/x.tar.gz", data_sha256="abc", data_official=False,
        device="cpu", decode_on="device")
    assert spec.flat().items() <= row.items() and env.environment("cpu").keys() <= row.keys()
    assert _row(spec, curves[:3], timed[2:], **kw)["final_train_loss"] == 1.2
    assert _row(spec, curves, [dict(seconds=0.5, steps=0, img_per_s=1.0)], **kw)["step_time_ms"] == 500.0
    empty = _row(spec, [], [], **kw)  # failed before its first evaluation point
    assert empty["iterations_done"] == 0 and empty["timed_windows"] == 0
    for k in ("final_train_loss", "final_train_err", "final_val_err", "final_test_err", "best_train_err",
              "best_val_err", "test_err_at_best_val", "best_test_err", "train_img_per_s", "group_img_per_s",
              "step_time_ms"):
        assert math.isnan(empty[k]), k


def test_each_run_trains_the_net_its_spec_and_data_set_describe(tmp_path, monkeypatch):
    """The trained net is the spec's (shortcut B: projections) on the data set's shape: 100 classes for
    CIFAR-100, one 28x28 channel for Fashion-MNIST; params, multiply-adds and weights say so."""
    from tests.fakes import cifar_python_dir, idx_file

    cifar_python_dir(tmp_path / "c100", n=40, classes=100, hundred=True)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in data.FASHION_FILES:
        idx_file(fashion / name, np.random.default_rng(0).integers(0, 10, (40, 28, 28) if "images" in name else 40))
    r = recipe("smoke", batch_size=8, iterations=2, eval_every=2, val_size=8, train_size=None, test_size=8)
    for dataset, root, classes, shape in (("cifar100", tmp_path / "c100", 100, (3, 32, 32)),
                                          ("fashion-mnist", fashion, 10, (1, 28, 28))):
        spec = RunSpec("resnet8", r, width=0.25, shortcut="B", dataset=dataset)
        row = run_one(spec, tmp_path / "out", CPU, data_root=root, progress=False)
        net = resnet.build("resnet8", classes, width=0.25, shortcut="B", in_channels=shape[0])
        assert row["status"] == "ok" and row["params"] == resnet.count_params(net)
        assert row["macs"] == resnet.count_macs(net, shape)  # 28x28 images cost less than 32x32 ones
        saved = checkpoints.load_torch(records.paths(tmp_path / "out", spec.run_id)["weights"])
        assert (saved["num_classes"], saved["in_channels"]) == (classes, shape[0])
        net.load_state_dict(saved["model"])  # the same layers, shortcut projections included


@pytest.mark.parametrize("channels_last", [True, False])
def test_the_step_sees_the_memory_format_asked_for(tmp_path, tiny, monkeypatch, channels_last):
    seen = []
    real = TrainStep.__call__

    def spy(self, x, y):
        conv = next(m for m in self.model.modules() if isinstance(m, nn.Conv2d))
        seen.append((x.is_contiguous(memory_format=torch.channels_last), x.is_contiguous(),
                     conv.weight.is_contiguous(memory_format=torch.channels_last), conv.weight.is_contiguous()))
        return real(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    ex = Execution("cpu", channels_last=channels_last)
    run_one(RunSpec("plain8", replace(tiny, iterations=2), width=0.25, dataset="synthetic"), tmp_path, ex, progress=False)
    assert seen == [(True, False, True, False) if channels_last else (False, True, False, True)] * 2


def test_the_step_is_built_as_the_execution_asks(tmp_path, tiny, monkeypatch):
    asked = []

    class Spy(TrainStep):
        def __init__(self, model, opt, **kwargs):
            asked.append(kwargs)
            super().__init__(model, opt, **kwargs | dict(execution="eager"))  # compiling would take a minute

    monkeypatch.setattr(train, "TrainStep", Spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    ex = Execution("cpu", amp=True, execution="compile", cudnn_benchmark=True)
    spec = RunSpec("plain8", replace(tiny, iterations=2), width=0.25, dataset="synthetic")
    run_one(spec, tmp_path / "one", ex, progress=False)
    assert torch.backends.cudnn.benchmark is True
    train.run_group([spec, replace(spec, seed=1)], tmp_path / "two", replace(ex, cudnn_benchmark=False), progress=False)
    assert asked == [dict(execution="compile", amp=True, device=cpu, members=k) for k in (1, 2)]
    assert torch.backends.cudnn.benchmark is False


def test_each_evaluation_point_scores_the_validation_and_test_sets_asked_for(tmp_path, tiny, monkeypatch):
    seen, real = [], sources.evaluate

    def spy(model, x, y, mean, ex, device, members=None):
        seen.append((len(x), len(y), torch.equal(mean.mean, want_mean) and mean.std is None, members.k))
        return real(model, x, y, mean, ex, device, members)

    monkeypatch.setattr(sources, "evaluate", spy)
    r = replace(tiny, val_size=48, test_size=40)  # 16 steps, an evaluation every 8
    arrays = data.load("synthetic")
    want_mean = data.pixel_mean(data.split(arrays, r.val_size, r.train_size)["train"][0])  # the training images'
    run_one(RunSpec("plain8", r, width=0.25, dataset="synthetic"), tmp_path, CPU, progress=False)
    assert seen == [(48, 48, True, 1), (40, 40, True, 1)] * 2


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_silent_elsewhere(monkeypatch):
    from bench.train import Progress

    monkeypatch.setattr(sys, "stderr", _Terminal())
    bar = Progress(10, 2, "plain8", enabled=True)  # a resumed run starts at its checkpoint
    assert not bar.bar.disable and (bar.bar.total, bar.bar.n, bar.bar.desc, bar.bar.unit) == (10, 2, "plain8", "step")
    assert not bar.bar.leave and bar.bar.dynamic_ncols  # a sweep's bars do not pile up
    bar.step(3)
    bar.step()
    bar.show(loss="1.250", err="0.400")
    assert bar.bar.n == 6 and bar.bar.postfix == "loss=1.250, err=0.400"
    assert "loss=" not in sys.stderr.getvalue()  # shown with the next draw: an evaluation point adds none of its own
    bar.close()
    assert "plain8:  20%" in sys.stderr.getvalue()  # drawn where it resumed; later draws are throttled
    assert sys.stderr.getvalue().endswith("\r")  # wiped when closed, not left on a line of its own
    assert Progress(10, 0, "x", enabled=False).bar.disable  # --no-progress, even on a terminal


@pytest.fixture
def bars(monkeypatch):
    """Every progress bar the runs make, each with what it was made with, how far it stepped, what it
    showed and whether it was closed."""
    made = []

    class Recorded(train.Progress):
        def __init__(self, total, initial, desc, enabled):
            super().__init__(total, initial, desc, enabled)
            self.made, self.enabled, self.steps, self.shown, self.closed = (total, initial, desc), enabled, 0, [], False
            made.append(self)

        def step(self, n=1):
            super().step(n)
            self.steps += n

        def show(self, **values):
            super().show(**values)
            self.shown.append(values)

        def close(self):
            super().close()
            self.closed = True

    monkeypatch.setattr(train, "Progress", Recorded)
    return made


def test_the_progress_bar_follows_its_run_and_shows_each_evaluation_point(tmp_path, tiny, interrupt, bars):
    shown = lambda c, k=1: [dict(loss=f"{p.train_loss:.3f}", train_err=f"{100 * p.train_err:.1f} %",  # noqa: E731
                                 val_err=f"{100 * p.val_err:.1f} %", img_s=f"{k * p.img_per_s:.0f}") for p in c.itertuples()]
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")  # 16 steps, an evaluation every 8
    interrupt(spec, tmp_path / "one", CPU)
    run_one(spec, tmp_path / "one", CPU, progress=False)
    first, resumed = bars
    assert first.made == (16, 0, "plain8 seed 0") and resumed.made == (16, 8, "plain8 seed 0")  # resumes where it stood
    assert (resumed.steps, resumed.closed) == (8, True)
    c = records.load(tmp_path / "one")[1]
    science = lambda bar: [{k: v for k, v in d.items() if k != "data_wait"} for d in bar.shown]  # noqa: E731
    assert science(first) + science(resumed) == shown(c)
    assert all(re.fullmatch(r"\d+ %", d["data_wait"]) for d in first.shown + resumed.shown)  # a share of the window
    # a group's bar counts every member's images and shows the first member's numbers
    bars.clear()
    twins = [spec, replace(spec, seed=1)]
    train.run_group(twins, tmp_path / "two", CPU, progress=False)
    (bar,) = bars
    assert bar.made == (16, 0, "2 x 8 layers") and (bar.steps, bar.closed) == (16, True)
    c = pd.read_parquet(records.paths(tmp_path / "two", twins[0].run_id)["curves"])
    assert science(bar) == shown(c, k=2)


def test_a_run_downloads_only_when_asked(tmp_path, tiny, monkeypatch):
    import torchvision

    from tests.fakes import cifar_python_dir

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda *a, **k: pytest.fail("downloaded without --download"))
    spec = RunSpec("plain8", replace(tiny, iterations=2, train_size=None, val_size=20, batch_size=8), width=0.25)
    with pytest.raises(data.DataError, match="cifar10 not found"):
        run_one(spec, tmp_path / "out", CPU, data_root=tmp_path / "empty", progress=False)
    with pytest.raises(data.DataError, match="cifar10 not found"):  # a group's default too
        train.run_group([spec], tmp_path / "out", CPU, data_root=tmp_path / "empty", progress=False)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **k: cifar_python_dir(Path(root)))
    row = run_one(spec, tmp_path / "out", CPU, data_root=tmp_path / "empty", download=True, progress=False)
    assert row["status"] == "ok" and row["data_source"] == str(tmp_path / "empty" / "cifar-10-batches-py")


def test_a_run_shows_its_progress_unless_told_not_to(tmp_path, tiny, bars):
    spec = RunSpec("plain8", replace(tiny, iterations=2), width=0.25, dataset="synthetic")
    run_one(spec, tmp_path / "a", CPU)
    run_one(spec, tmp_path / "b", CPU, progress=False)
    train.run_group([spec], tmp_path / "c", CPU)
    assert [b.enabled for b in bars] == [True, False, True]
