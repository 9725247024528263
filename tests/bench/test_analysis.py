"""Why plain nets degrade: lesion study (Veit et al. 2016) and shattered gradients (Balduzzi et al. 2017)."""
import copy
from pathlib import Path

import pytest
import torch

from click.testing import CliRunner
from torch import nn

import resnet
from bench import probes, records
from bench.analysis import (calibrate_bn, correlation_by_distance, lesion_errors, lesion_ks, lesion_sets,
                            line_gradients)
from bench.cli import main


def _eval_net(name, seed=0):
    torch.manual_seed(seed)
    net = resnet.build(name, width=0.5)
    with torch.no_grad():  # running statistics other than 0/1, so BN is not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.1, 0.1)
    return net.eval()


def test_deleting_a_residual_block_with_zero_last_bn_changes_nothing_exactly():
    net = _eval_net("resnet14")
    x = torch.randn(4, 3, 32, 32)
    for i, block in enumerate(resnet.blocks(net)):
        with torch.no_grad():
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        assert torch.equal(resnet.lesioned(net, [i])(x), net(x)), i  # bit for bit: the branch added exactly 0


def test_deleting_a_block_of_a_plain_net_changes_it():
    net = _eval_net("plain14")
    x = torch.randn(4, 3, 32, 32)
    deletable = [i for i, b in enumerate(resnet.blocks(net)) if resnet.deletable(b)]
    assert deletable == [0, 1, 3, 5]  # the first block of stages 2 and 3 changes the shape
    for i in deletable:
        assert not torch.allclose(resnet.lesioned(net, [i])(x), net(x))
    with pytest.raises(ValueError, match="changes the shape cannot be deleted"):
        resnet.lesioned(net, [2])
    # the original is untouched
    assert all(type(b).__name__ == "BasicBlock" for b in resnet.blocks(net)) and len(resnet.blocks(net)) == 6


def test_lesion_rows_cover_single_blocks_and_random_sets():
    net = _eval_net("resnet14")
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    rows = lesion_errors(net, x, y, torch.zeros(3, 32, 32), seed=0, draws=2)
    single = [(r["position"], r["blocks"]) for r in rows if r["mode"] == "single"]
    # blocks 0, 1, 3, 5 keep their shape; 2 and 4 open stages 2 and 3 (option A: a residual net can lose them)
    assert single == [("same", "0"), ("same", "1"), ("same", "3"), ("same", "5"), ("downsampling", "2"),
                      ("downsampling", "4")]
    random_ = [r for r in rows if r["mode"] == "random"]
    assert [r["k"] for r in random_] == [1, 1, 2, 2, 3, 3, 4]  # 2 draws each; of 4 blocks there is one set of 4
    assert all(set(map(int, r["blocks"].split(","))) <= {0, 1, 3, 5} for r in random_)  # matched positions only
    assert [r["mode"] for r in rows].count("intact") == 1 and all(0 <= r["error"] <= 1 for r in rows)


def test_plain_and_residual_twins_lose_the_same_block_positions():
    """A plain net cannot lose a downsampling block (nothing would carry its input), a residual net can:
    compared, and drawn at random, are the positions both can lose; the downsampling ones stand apart."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (8,))
    tables = {}
    for name in ("plain20", "resnet20"):
        rows = lesion_errors(_eval_net(name), x, y, torch.zeros(3, 32, 32), seed=3, draws=3)
        tables[name] = rows
    same = lambda rows: [(r["mode"], r["k"], r["blocks"]) for r in rows if r["position"] == "same"]  # noqa: E731
    assert same(tables["plain20"]) == same(tables["resnet20"])  # the same seed: the same sets, too
    assert {r["position"] for r in tables["plain20"]} == {"none", "same"}
    assert [r["blocks"] for r in tables["resnet20"] if r["position"] == "downsampling"] == ["3", "6"]


def test_random_lesions_are_drawn_from_the_runs_seed_and_k():
    same = list(range(19))  # a 44-layer net's blocks that keep their shape
    assert lesion_sets(same, seed=0, k=4, draws=5) == lesion_sets(same, seed=0, k=4, draws=5)  # a rerun
    assert lesion_sets(same, seed=0, k=4, draws=5) != lesion_sets(same, seed=1, k=4, draws=5)  # another seed
    assert lesion_sets(same, seed=0, k=4, draws=5) != lesion_sets(same, seed=0, k=5, draws=5)[:5]  # another k
    assert all(len(set(s)) == 4 for s in lesion_sets(same, seed=0, k=4, draws=5))
    assert lesion_sets([1, 3, 5], seed=0, k=2, draws=10) == [(1, 3), (1, 5), (3, 5)]  # few: each set once
    assert lesion_ks(19) == [1, 2, 3, 4, 5, 6, 7, 8, 16, 19] and lesion_ks(4) == [1, 2, 3, 4] and lesion_ks(0) == []


def test_a_calibrated_initial_nets_eval_mode_is_its_train_mode_on_the_calibration_batch():
    """A new BN layer's running statistics are 0 and 1: in eval mode it is the identity, and an "initial
    net" a net without BN. Calibrated on one batch, each BN layer's running mean is the batch mean of its
    input and its running variance the unbiased variance, n / (n - 1) times the biased one train mode
    divides by (n: images x positions). Undo that factor and eval mode is train mode (float64)."""
    torch.manual_seed(0)
    net = resnet.build("plain20", width=0.5).double()
    x = torch.randn(16, 3, 32, 32, dtype=torch.float64) * 0.25 + 0.1
    raw = net.eval()(x)
    calibrate_bn(net, [x])
    assert not net.training and all(m.momentum == 0.1 for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    inputs = {}
    twin = copy.deepcopy(net)  # a train-mode pass updates the running statistics: on a copy
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m, t in zip(bns, [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)]):
        t.register_forward_hook(lambda _t, i, o, m=m: inputs.update({m: i[0]}))  # returns None: output kept
    trained_mode = twin.train()(x)
    assert len(inputs) == 19
    for m, t in inputs.items():
        n = t.numel() // t.shape[1]
        torch.testing.assert_close(m.running_mean, t.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_var, t.var((0, 2, 3), unbiased=True), rtol=1e-10, atol=1e-12)
        m.running_var.mul_((n - 1) / n)
    torch.testing.assert_close(net.eval()(x), trained_mode, rtol=1e-9, atol=1e-9)
    assert (raw - trained_mode).abs().max() > 0.1  # uncalibrated, the "initial net" is another net
    calibrate_bn(net, [x[:8], x[8:]])  # two batches: the equal-weight average of their statistics
    stem = net.stem[0]
    torch.testing.assert_close(net.stem[1].running_mean, (stem(x[:8]).mean((0, 2, 3)) + stem(x[8:]).mean((0, 2, 3))) / 2)


def test_the_gradient_line_is_centred_on_the_image_and_one_at_distance_zero():
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 10))
    x0 = torch.randn(3, 8, 8)
    g = line_gradients(relu, x0, steps=8, step=0.05)
    assert g.shape == (17, 192)
    x = x0[None].clone().requires_grad_(True)
    z = relu(x)
    cls = int(z.argmax(1))
    (z[0, cls] - z[0].mean()).backward()
    torch.testing.assert_close(g[8], x.grad.flatten())  # the middle row: the image itself, of z_c - mean z
    c = correlation_by_distance(g)
    assert len(c) == 9 and c[0] == pytest.approx(1.0)
    assert c[-1] < 1 - 1e-4  # a ReLU net is only piecewise linear: below 1 once the line crosses kinks


def test_gradient_correlation_is_one_for_a_linear_map_and_zero_for_noise():
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    assert correlation_by_distance(line_gradients(linear, torch.randn(3, 8, 8), steps=8)) == pytest.approx([1.0] * 9)
    noise = torch.randn(2001, 500, generator=torch.Generator().manual_seed(0))
    assert abs(sum(correlation_by_distance(noise)[1:]) / 1000) < 0.01


def test_a_net_with_no_input_gradient_has_no_gradient_correlation_not_zero():
    """Fixup's classifier starts at zero: every input gradient is exactly zero, and C(d) is undefined
    (NaN), not the 0 of gradients that have shattered."""
    import math

    import resnet

    torch.manual_seed(0)
    fixup = resnet.build("fixup8", width=0.25)
    g = line_gradients(fixup, torch.randn(3, 32, 32), steps=4)
    assert not g.any() and all(math.isnan(c) for c in correlation_by_distance(g))
    g[:, 0] = 1.0  # one point's gradient zero, the others not: only that one has no correlation
    g[1] = 0.0
    c = correlation_by_distance(g)
    assert c[0] == pytest.approx(1.0) and math.isnan(c[3]) and c[2] == pytest.approx(1.0)


def test_grad_times_weight_norm_does_not_see_the_scale_of_a_weight_in_front_of_bn():
    """By hand: behind BN (train mode), y = BN(c W * x) = BN(W * x) for any c > 0 (BN divides by the
    batch's std, which scales by c; eps 1e-12 makes that exact to ~1e-12), so the loss as a function of
    W is scale-free and dL/d(cW) = dL/dW / c: with c = 10 the weight norm grows tenfold, the raw
    gradient norm shrinks tenfold, and their product is unchanged. The head, after the BN, sees nothing."""
    from bench.fuse import Members

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=1e-12), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 6 * 6, 10))
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (8,))
    net = net.double()
    rows = {}
    for scale in (1.0, 10.0):
        with torch.no_grad():
            net[0].weight.mul_(scale)
        net.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        members = Members([net])
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        rows[scale] = {r["layer_name"]: r for r in probes.layer_rows(members, opt, {0: "r"}, 1)[0]}
        with torch.no_grad():
            net[0].weight.div_(scale)
    a, b = rows[1.0]["0"], rows[10.0]["0"]
    assert b["weight_norm"] == pytest.approx(10 * a["weight_norm"], rel=1e-12)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"] / 10, rel=1e-9)  # the raw norm follows the scale
    assert b["grad_x_weight"] == pytest.approx(a["grad_x_weight"], rel=1e-9)  # ||g|| ||W|| does not
    assert a["grad_rms"] == pytest.approx(a["grad_norm"] / (4 * 3 * 3 * 3) ** 0.5, rel=1e-12)  # per parameter
    assert rows[10.0]["4"]["grad_norm"] == pytest.approx(rows[1.0]["4"]["grad_norm"], rel=1e-9)  # the head: unchanged


TINY = ["--dataset", "synthetic", "--models", "plain,resnet", "--depths", "8,14", "--width", "0.25", "--batch-size",
        "32", "--train-size", "128", "--val-size", "32", "--test-size", "64", "--iterations", "8", "--eval-every", "4",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """A finished sweep of four tiny nets, with their weights (copy it before writing into it)."""
    out = tmp_path_factory.mktemp("swept")
    assert CliRunner().invoke(main, ["sweep", *TINY, "--out", str(out)]).exit_code == 0
    return out


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_diagnose_writes_its_parquet_and_the_report_draws_it(swept, tmp_path):
    import shutil

    import pandas as pd

    tmp_path = Path(shutil.copytree(swept, tmp_path / "s"))
    res = CliRunner().invoke(main, ["diagnose", str(tmp_path)])
    assert res.exit_code == 0, res.output
    les = pd.read_parquet(tmp_path / "analysis" / "lesion.parquet")
    sha = pd.read_parquet(tmp_path / "analysis" / "shattered.parquet")
    assert set(les["model"]) == {"plain8", "resnet8", "plain14", "resnet14"}
    assert (les["images"] == 2000).all()  # the whole (synthetic) test set, not the recipe's 64
    assert set(sha["state"]) == {"init", "trained"} and sha.groupby(["model", "state"]).size().eq(8 * 33).all()
    assert set(sha["bn_statistics"]) == {"calibrated on 128 training images", "running averages of training"}
    assert (sha.loc[sha["k"] == 0, "correlation"] - 1).abs().max() < 1e-12
    rep = CliRunner().invoke(main, ["report", str(tmp_path), "--no-responses"])
    assert rep.exit_code == 0, rep.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "lesion.png" in md and "shattered.png" in md and "Veit" in md and "Balduzzi" in md
    assert "gradients.png" in md and "Why do plain nets degrade?" in md  # recorded during training; the summary
    signals = pd.read_parquet(next((tmp_path / "signals").glob("resnet14-*.parquet")))
    assert list(signals.columns) == records.SIGNAL_COLUMNS and sorted(signals["iteration"].unique()) == [4, 8]
    assert signals.groupby("iteration")["block_name"].apply(list).to_dict()[8] == [
        n for n, m in resnet.build("resnet14").named_modules() if type(m).__name__ == "BasicBlock"]
    assert (signals["signal_rms"] > 0).all() and (signals["batches"] == 2).all()
    bad = CliRunner().invoke(main, ["diagnose", str(tmp_path / "nothing")])
    assert bad.exit_code != 0 and "not a results folder" in bad.output


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_an_interrupted_diagnose_resumes_from_its_finished_runs_and_ends_as_one_that_ran_through(swept, tmp_path,
                                                                                                monkeypatch):
    import shutil

    import pandas as pd

    from bench import analysis

    whole, cut = (Path(shutil.copytree(swept, tmp_path / name)) for name in ("whole", "cut"))
    opts = dict(max_images=64, draws=2, images=2, progress=False)
    runs = records.load(swept)[0]
    expected = analysis.diagnose(whole, runs, **opts)
    earlier = pd.DataFrame(dict(run_id=["from an earlier diagnose"]))
    records.write_parquet(earlier, cut / "analysis" / "lesion.parquet")
    calls, interrupt_at = [], [3]

    def counted(net, *a, **k):
        calls.append(1)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # Ctrl-C in the third run
        return lesion_errors(net, *a, **k)

    monkeypatch.setattr(analysis, "lesion_errors", counted)
    with pytest.raises(KeyboardInterrupt):
        analysis.diagnose(cut, runs, **opts)
    interrupt_at[0] = None
    parts = sorted((cut / "analysis" / "parts").iterdir())
    assert len(parts) == 2 and all(p.suffix == ".json" for p in parts)
    pd.testing.assert_frame_equal(pd.read_parquet(cut / "analysis" / "lesion.parquet"), earlier)  # untouched
    calls.clear()
    other = analysis.diagnose(tmp_path / "cut", runs, **(opts | dict(draws=3)))  # other options: parts not used
    assert len(calls) == 4 and len(list((cut / "analysis" / "parts").iterdir())) == 2
    assert other["lesion"]["draw"].max() == 2
    records.write_parquet(earlier, cut / "analysis" / "lesion.parquet")
    calls.clear()
    resumed = analysis.diagnose(cut, runs, **opts)
    assert len(calls) == 2  # the two runs the interrupted diagnose had not finished
    for name in ("lesion", "shattered"):
        pd.testing.assert_frame_equal(resumed[name], expected[name])
        pd.testing.assert_frame_equal(pd.read_parquet(cut / "analysis" / f"{name}.parquet"), expected[name])
    assert not (cut / "analysis" / "parts").exists()


def test_a_plain_block_is_deletable_only_where_its_input_and_output_shapes_match():
    """ImageNet-style bottlenecks change the channels without a stride (64 -> 256 in the first block):
    shape means stride and channels both."""
    net = resnet.build("plain50", width=0.125)
    first, second = resnet.blocks(net)[:2]
    assert first.conv2.stride == (1, 1) and not resnet.deletable(first)  # 8 -> 32 channels at stride 1
    assert resnet.deletable(second)
    x = torch.randn(2, 3, 32, 32)
    assert resnet.lesioned(net.eval(), [1])(x).shape == (2, 10)


def test_diagnose_says_what_bounds_its_time_and_where_it_is_without_a_terminal(swept, tmp_path):
    import shutil

    folder = Path(shutil.copytree(swept, tmp_path / "s"))
    res = CliRunner().invoke(main, ["diagnose", str(folder), "--max-images", "32", "--draws", "1",
                                    "--shattered-images", "1"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert "diagnose 4 runs; what takes the time, per run:" in text
    assert "the first 32 test images (--max-images)" in text and "1 images (--shattered-images)" in text
    assert "whatever --max-images" in text  # the shattered gradients are not bounded by it
    steps = [ln for ln in text.splitlines() if ln.startswith("[") and "diagnosed;" in ln]
    assert [ln.split("]")[0] + "]" for ln in steps] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert "so far, about" in steps[0]
