"""The training step's executions and the profiler. CUDA parts skip without a GPU."""
import pandas as pd
import pytest
import torch

import resnet
from bench import records
from bench.profile import Config, measure, peak_flops, pipeline_comparison, profile
from bench.specs import Execution, RunSpec
from bench.steps import TrainStep, make_optimizer, set_lr
from bench.train import run_one

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def _train(execution, device, steps=6, amp=False):
    torch.manual_seed(0)
    net = resnet.build("resnet8", width=0.5).to(device)
    opt = make_optimizer(net, 0.1, 0.9, 1e-4, device)
    step = TrainStep(net, opt, execution=execution, amp=amp, device=device)
    g = torch.Generator().manual_seed(1)
    for i in range(steps):
        if i == 3:
            set_lr(opt, 0.01)
        x = torch.randn(16, 3, 32, 32, generator=g).to(device)
        y = torch.randint(0, 10, (16,), generator=g).to(device)
        step(x, y)
    return net, step.read()


def test_eager_step_counts_loss_and_errors_on_device():
    net, (loss, err, n) = _train("eager", torch.device("cpu"))
    assert n == 96 and 0 <= err <= 1 and loss > 0


def test_bad_execution_is_refused():
    with pytest.raises(ValueError, match="cudagraph"):
        Execution.for_device("cpu", execution="cudagraph")
    with pytest.raises(ValueError, match="execution must be"):
        Execution.for_device("cpu", execution="jit")


def test_interrupted_run_resumes_to_the_same_curves(tmp_path, tiny, interrupt):
    """Ctrl-C after the first checkpoint, then the same call again: curves as if never stopped."""
    ex = Execution.for_device("cpu")
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    run_one(spec, tmp_path / "ref", ex, progress=False)
    interrupt(spec, tmp_path / "cut", ex)
    run_one(spec, tmp_path / "cut", ex, progress=False)
    a, b = records.load(tmp_path / "ref")[1], records.load(tmp_path / "cut")[1]
    cols = ["iteration", "lr", "train_loss", "train_err", "val_err", "test_err"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_peak_table():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "tf32") == 378e12
    assert peak_flops("NVIDIA H200", "fp32") == 67e12
    assert peak_flops("NVIDIA GeForce RTX 3090", "bf16") is None and peak_flops(None, "bf16") is None


def test_profile_on_cpu_writes_rows_with_spread():
    df = profile(["resnet8"], [8, 16], precisions=("fp32",), formats=("nchw", "channels_last"), modes=("train", "infer"),
                 device="cpu", log=lambda s: None, repeats=3, warmup=1, block_s=0.02)
    assert len(df) == 8 and (df["status"] == "ok").all()
    assert (df["img_per_s_min"] <= df["img_per_s"]).all() and (df["img_per_s"] <= df["img_per_s_max"]).all()
    assert df["mfu"].isna().all()  # no peak known for a CPU
    assert df["macs"].iloc[0] == resnet.count_macs(resnet.build("resnet8"))


def test_profile_times_run_groups_as_one_grouped_step(monkeypatch):
    from bench import profile as prof

    shapes = []
    real = TrainStep.__call__

    def spy(self, x, y):
        shapes.append((tuple(x.shape), tuple(y.shape), self.members))
        return real(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", spy)
    df = profile(["plain8"], [8], precisions=("fp32",), formats=("nchw",), modes=("train",), group_sizes=(1, 3),
                 device="cpu", log=lambda s: None, repeats=2, warmup=1, block_s=0.02)
    assert list(df["group_size"]) == [1, 3] and (df["status"] == "ok").all()
    assert {s for s in shapes} == {((8, 3, 32, 32), (8,), 1), ((8, 9, 32, 32), (8, 3), 3)}
    # img/s of a group counts every member's images: steps x batch x K over the time
    row = df.iloc[1]
    assert row["step_ms"] == pytest.approx(1e3 * 8 * 3 / row["img_per_s"])
    assert row["macs"] == resnet.count_macs(resnet.build("plain8"))  # per member
    with pytest.raises(ValueError, match="group-sizes above 1 need CIFAR nets"):
        prof.resolve_grid("cpu", models=("resnet18",), group_sizes=(1, 2))


def test_profile_records_errors_instead_of_crashing():
    row = measure(Config("resnet8", 4, execution="cudagraph"), torch.device("cpu"), warmup=1, repeats=1)
    assert row["status"] == "error" and "CUDA" in row["error"]


def test_pipeline_comparison_on_cpu(cifar_root):
    df = pipeline_comparison("resnet8", 32, "cpu", data_root=cifar_root, workers=0, steps=3, warmup=1,
                             log=lambda s: None)
    assert list(df["pipeline"]) == ["baseline", "ours"] and df["speedup"].iloc[0] == 1.0
    assert (df["img_per_s"] > 0).all() and (df["data"] == "cifar10").all()


@pytest.mark.gpu
@needs_cuda
def test_cudagraph_step_matches_eager():
    torch.backends.cudnn.deterministic = True
    try:
        dev = torch.device("cuda")
        eager, (l1, e1, _) = _train("eager", dev)
        graph, (l2, e2, _) = _train("cudagraph", dev)
    finally:
        torch.backends.cudnn.deterministic = False
    # a graph that kept its warm-up updates would be off by a whole step, far beyond these bounds
    assert l1 == pytest.approx(l2, rel=1e-3) and e1 == pytest.approx(e2, abs=0.02)
    for (n, a), b in zip(eager.state_dict().items(), graph.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), n


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("execution", ["eager", "cudagraph"])
def test_cuda_run_and_resume(tmp_path, tiny, interrupt, execution):
    ex = Execution.for_device("cuda", execution=execution)
    spec = RunSpec("resnet20", tiny, dataset="synthetic")
    row = run_one(spec, tmp_path / "ref", ex, progress=False)
    assert row["status"] == "ok" and row["gpu_name"] and row["peak_memory_bytes"] > 0
    assert row["train_path"] == f"device-loader+{execution}" and row["amp"] and row["channels_last"]
    interrupt(spec, tmp_path / "cut", ex)
    run_one(spec, tmp_path / "cut", ex, progress=False)
    a, b = records.load(tmp_path / "ref")[1], records.load(tmp_path / "cut")[1]
    assert a["iteration"].tolist() == b["iteration"].tolist()
    assert (a["train_loss"] - b["train_loss"]).abs().max() < 0.05  # cuDNN autotuning may pick other kernels


@pytest.mark.gpu
@needs_cuda
def test_profile_on_cuda_reports_mfu():
    df = profile(["resnet20"], [128], executions=("eager", "cudagraph"), device="cuda", log=print, repeats=2,
                 warmup=3, block_s=0.05)
    assert (df["status"] == "ok").all(), df[["execution", "mode", "error"]]
    if peak_flops(torch.cuda.get_device_name(), "bf16"):
        assert (df["mfu"] > 0).all()


def test_profile_cli_on_cpu(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    args = ["profile", "--device", "cpu", "--models", "resnet8", "--batch-sizes", "4,4", "--precisions", "fp32",
            "--formats", "nchw", "--modes", "train", "--repeats", "2", "--block-s", "0.01", "--no-baseline",
            "--out", str(tmp_path), "--name", "p"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    df = pd.read_parquet(tmp_path / "profile" / "p.parquet")
    assert len(df) == 1 and df.loc[0, "status"] == "ok"  # the repeated batch size is timed once
    bad = CliRunner().invoke(main, ["profile", "--device", "cpu", "--executions", "cudagraph", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "cudagraph needs CUDA" in bad.output
    bad = CliRunner().invoke(main, ["profile", "--device", "cpu", "--precisions", "fp8", "--out", str(tmp_path)])
    assert bad.exit_code == 1 and "fp8 not one of fp32, tf32, bf16" in bad.output
