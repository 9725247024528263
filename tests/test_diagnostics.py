"""Why plain nets degrade: lesion study (Veit et al. 2016) and shattered gradients (Balduzzi et al. 2017)."""
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import resnet
from bench.analysis import lesion_errors, line_gradients, neighbour_correlation
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
    net = _eval_net("resnet8")
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (20,))
    rows = lesion_errors(net, x, y, torch.zeros(3, 32, 32), draws=2)
    single = [r for r in rows if r["mode"] == "single"]
    random_ = [r for r in rows if r["mode"] == "random"]
    assert [r["block"] for r in single] == [0, 1, 2]  # option A: every residual block can go
    assert sorted({r["k"] for r in random_}) == [0, 1, 2, 3] and len(random_) == 1 + 3 * 2
    assert all(0 <= r["error"] <= 1 for r in rows)


def test_gradient_correlation_is_one_for_a_linear_map_and_zero_for_noise():
    assert neighbour_correlation(torch.ones(50, 10) * torch.randn(10)) == pytest.approx(1.0)
    noise = torch.randn(2000, 500, generator=torch.Generator().manual_seed(0))
    assert abs(neighbour_correlation(noise)) < 0.01
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    g = line_gradients(linear, torch.randn(3, 8, 8), steps=16)
    assert g.shape == (16, 192) and neighbour_correlation(g) == pytest.approx(1.0, abs=1e-6)
    # a ReLU net is only piecewise linear: below 1 once the line crosses kinks
    torch.manual_seed(0)
    relu = nn.Sequential(nn.Flatten(), nn.Linear(192, 256), nn.ReLU(), nn.Linear(256, 10))
    assert neighbour_correlation(line_gradients(relu, torch.randn(3, 8, 8), steps=64, step=0.5)) < 1 - 1e-4


TINY = ["--dataset", "synthetic", "--models", "plain,resnet", "--depths", "8,14", "--width", "0.25", "--batch-size",
        "32", "--train-size", "128", "--val-size", "32", "--test-size", "64", "--iterations", "8", "--eval-every", "4",
        "--device", "cpu"]


def test_diagnose_writes_its_parquet_and_the_report_draws_it(tmp_path):
    import pandas as pd

    assert CliRunner().invoke(main, ["sweep", *TINY, "--out", str(tmp_path)]).exit_code == 0
    res = CliRunner().invoke(main, ["diagnose", str(tmp_path)])
    assert res.exit_code == 0, res.output
    les = pd.read_parquet(tmp_path / "analysis" / "lesion.parquet")
    sha = pd.read_parquet(tmp_path / "analysis" / "shattered.parquet")
    assert set(les["model"]) == {"plain8", "resnet8", "plain14", "resnet14"}
    assert set(sha["state"]) == {"init", "trained"} and sha.groupby(["model", "state"]).size().eq(8).all()
    rep = CliRunner().invoke(main, ["report", str(tmp_path), "--no-responses"])
    assert rep.exit_code == 0, rep.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "lesion.png" in md and "shattered.png" in md and "Veit" in md and "Balduzzi" in md
    assert "gradient_norms.png" in md  # recorded during training
    bad = CliRunner().invoke(main, ["diagnose", str(tmp_path / "nothing")])
    assert bad.exit_code != 0 and "not a results folder" in bad.output


def test_a_plain_block_is_deletable_only_where_its_input_and_output_shapes_match():
    """ImageNet-style bottlenecks change the channels without a stride (64 -> 256 in the first block):
    shape means stride and channels both."""
    net = resnet.build("plain50", width=0.125)
    first, second = resnet.blocks(net)[:2]
    assert first.conv2.stride == (1, 1) and not resnet.deletable(first)  # 8 -> 32 channels at stride 1
    assert resnet.deletable(second)
    x = torch.randn(2, 3, 32, 32)
    assert resnet.lesioned(net.eval(), [1])(x).shape == (2, 10)
