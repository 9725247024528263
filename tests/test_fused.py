"""Fused training (bench.train.run_group): a group of K runs must be the same experiment as K runs.

CPU, no amp, a group of four: plain8 and resnet8, seeds 0 and 1 (width 0.25, batch 32, 20 steps).
A grouped convolution sums the same products in another order than K separate ones, and training
amplifies that rounding. Measured on the 2-core CI machine (torch 2.14.1) after 20 steps in fp32:
train losses agree to 1.5e-5, weights to 2.5e-3, training errors exactly and test errors to one
image in 256; the same runs in float64 agree to 1.4e-15 in the weights. So the fp32 test bounds
losses by 1e-4 and weights by 1e-2, and the float64 tests, which also check resuming, by 1e-9:
any real mistake (a member seeing another's data, gradient, momentum or BN statistics) is orders of
magnitude larger.
"""
from dataclasses import replace

import pandas as pd
import pytest
import torch

import resnet
from bench import claims, data, fuse, records
from bench.specs import Execution, RunSpec, recipe
from bench.train import run_group, run_one

CPU = Execution.for_device("cpu", amp=False)
MEMBERS = [("plain8", 0), ("resnet8", 0), ("plain8", 1), ("resnet8", 1)]


def _specs(n_eval=256, batch=32):
    r = recipe("smoke", batch_size=batch, iterations=20, eval_every=10, train_size=256, val_size=n_eval,
               test_size=n_eval)
    return [RunSpec(m, r, seed=s, width=0.25, dataset="synthetic") for m, s in MEMBERS]


def _two_steps():
    """Two members of _specs, trained for two steps with an evaluation point after each."""
    return [replace(s, recipe=replace(s.recipe, iterations=2, eval_every=1)) for s in _specs(n_eval=32)[:2]]


def _curves(out, spec):
    return pd.read_parquet(records.paths(out, spec.run_id)["curves"])


def _science(curves):
    return curves.drop(columns=["train_time_s", "img_per_s"])  # what was learned, not how fast


def _weights(out, spec):
    return records.load_torch(records.paths(out, spec.run_id)["weights"])["model"]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The four runs trained separately and as one group (fp32), and each member's weights as the group began."""
    out = tmp_path_factory.mktemp("fused")
    specs = _specs()
    for s in specs:
        run_one(s, out / "alone", CPU, progress=False)
    initial = []
    real_init = fuse.Members.__init__

    def spy(self, nets):
        real_init(self, nets)
        initial.extend(self.state(k) for k in range(self.k))

    fuse.Members.__init__ = spy
    try:
        rows = run_group(specs, out / "group", CPU, progress=False)
    finally:
        fuse.Members.__init__ = real_init
    return out, specs, rows, initial


def test_each_member_starts_from_the_weights_its_seed_gives_alone(trained):
    _, specs, _, initial = trained
    assert len(initial) == 4
    for s, state in zip(specs, initial):
        torch.manual_seed(s.seed)
        alone = resnet.build(s.model, width=s.width).state_dict()
        assert all(torch.equal(state[k], alone[k]) for k in alone), s.run_id


def test_a_group_of_four_trains_like_four_separate_runs(trained):
    out, specs, rows, _ = trained
    for s, row in zip(specs, rows):
        a, b = _curves(out / "alone", s), _curves(out / "group", s)
        assert list(a["iteration"]) == list(b["iteration"]) == [10, 20]
        assert (a["train_loss"] - b["train_loss"]).abs().max() < 1e-4
        assert (a["train_err"] - b["train_err"]).abs().max() <= 1 / 320  # one image of 10 steps x 32
        assert (a["test_err"] - b["test_err"]).abs().max() <= 1 / 256
        start = resnet.build(s.model, width=s.width).state_dict()
        assert _max_diff(_weights(out / "alone", s), start) > 0.05  # training moved the weights ...
        assert _max_diff(_weights(out / "group", s), _weights(out / "alone", s)) < 1e-2  # ... the same way


def test_members_keep_their_own_records_with_their_group(trained):
    out, specs, rows, _ = trained
    alone, _ = records.load(out / "alone")
    group, _ = records.load(out / "group")
    assert sorted(group["run_id"]) == sorted(s.run_id for s in specs) == sorted(alone["run_id"])
    assert set(group.columns) == set(alone.columns)
    assert (group["group_size"] == 4).all() and group["group_id"].nunique() == 1
    assert (alone["group_size"] == 1).all() and (alone["group_id"] == alone["run_id"]).all()
    assert [r["run_id"] for r in rows] == [s.run_id for s in specs]
    # each member's own images per second; the group's count all four
    assert list(group["group_img_per_s"]) == pytest.approx(list(4 * group["train_img_per_s"]))
    for s in specs:
        layers = pd.read_parquet(records.paths(out / "group", s.run_id)["layers"])
        solo = pd.read_parquet(records.paths(out / "alone", s.run_id)["layers"])
        assert list(layers["layer_name"]) == list(solo["layer_name"])  # every weighted layer, every point
        # fp32 rounding, amplified by 20 steps, moves gradient norms by up to 2 % (measured); float64 below
        assert ((layers["grad_norm"] - solo["grad_norm"]).abs() / solo["grad_norm"]).max() < 0.05
        assert not records.paths(out / "group", s.run_id)["ckpt"].exists()


def _nan_pixel(monkeypatch, step, channel):
    """Group batch ``step`` (0-based) gets a NaN in its first image's ``channel``: one member's input."""
    real = data.group_batch

    def poisoned(loaders, it):
        x, y = real(loaders, it)
        if it == step:
            x[0, channel, 0, 0] = float("nan")
        return x, y

    monkeypatch.setattr(data, "group_batch", poisoned)


def test_a_nan_in_one_member_leaves_the_others_unchanged(trained, tmp_path, monkeypatch):
    out, specs, _, _ = trained
    _nan_pixel(monkeypatch, step=12, channel=6)  # step 13: member 2 (plain8, seed 1; channels 6..8)
    rows = run_group(specs, tmp_path, CPU, progress=False)
    assert [r["status"] for r in rows] == ["ok", "ok", "diverged", "ok"]
    assert "iteration 20" in rows[2]["error"]
    for k in (0, 1, 3):
        pd.testing.assert_frame_equal(_science(_curves(tmp_path, specs[k])), _science(_curves(out / "group", specs[k])))
        assert _max_diff(_weights(tmp_path, specs[k]), _weights(out / "group", specs[k])) == 0
    bad = _curves(tmp_path, specs[2])
    assert bad["train_loss"].isna().tolist() == [False, True]


def test_a_member_that_diverges_early_leaves_its_twin_to_train_on_unchanged(tmp_path, tiny, monkeypatch):
    """Member 1 gets a NaN pixel at step 3, is found diverged at the evaluation after step 8 and dropped;
    member 0 trains on to step 16 exactly as it does beside a healthy twin."""
    twins = [RunSpec("plain8", tiny, seed=s, width=0.25, dataset="synthetic") for s in (0, 1)]
    run_group(twins, tmp_path / "healthy", CPU, progress=False)
    _nan_pixel(monkeypatch, step=2, channel=3)  # member 1's first channel
    rows = run_group(twins, tmp_path / "sick", CPU, progress=False)
    assert [r["status"] for r in rows] == ["ok", "diverged"] and rows[1]["iterations_done"] == 8
    pd.testing.assert_frame_equal(_science(_curves(tmp_path / "sick", twins[0])),
                                  _science(_curves(tmp_path / "healthy", twins[0])))
    assert _max_diff(_weights(tmp_path / "sick", twins[0]), _weights(tmp_path / "healthy", twins[0])) == 0


@pytest.fixture
def float64(monkeypatch):
    """Train in float64: nets, batches and evaluation images (the optimizer follows the weights)."""
    build = resnet.build
    monkeypatch.setattr(resnet, "build", lambda *a, **k: build(*a, **k).double())
    monkeypatch.setattr(data.DeviceLoader, "normalize", lambda self, x: x.double().div_(255).sub_(self.mean))
    batches = data.eval_batches
    monkeypatch.setattr(data, "eval_batches", lambda *a, **k: (b.double() for b in batches(*a, **k)))


def test_members_resume_alone_or_in_a_group_and_continue_identically(tmp_path, interrupt, float64):
    specs = _specs(n_eval=64, batch=16)
    for s in specs:
        run_one(s, tmp_path / "alone", CPU, progress=False)
    interrupt(specs, tmp_path / "cut", CPU)  # the group stops once all four checkpoints are written
    # member 1 alone; the other three as a group of three
    alone = run_one(specs[1], tmp_path / "cut", CPU, progress=False)
    assert alone["resumed_from"] == 10 and alone["group_size"] == 1 and alone["group_id"] == specs[1].run_id
    rows = run_group([specs[0], specs[2], specs[3]], tmp_path / "cut", CPU, progress=False)
    assert [(r["resumed_from"], r["group_size"]) for r in rows] == [(10, 3)] * 3  # the last attempt's group
    for s in specs:
        a, b = _curves(tmp_path / "alone", s), _curves(tmp_path / "cut", s)
        pd.testing.assert_frame_equal(_science(a), _science(b), rtol=1e-9, atol=1e-9)
        assert _max_diff(_weights(tmp_path / "alone", s), _weights(tmp_path / "cut", s)) < 1e-9
        la, lb = (pd.read_parquet(records.paths(tmp_path / o, s.run_id)["layers"]) for o in ("alone", "cut"))
        pd.testing.assert_frame_equal(la, lb, rtol=1e-9, atol=1e-12)  # norms of weights, gradients, momentum
    # the whole group again: every member is recorded, so each is skipped, and nothing is trained
    again = run_group(specs, tmp_path / "cut", CPU, progress=False)
    assert all(isinstance(r, claims.Skip) and "already recorded" in str(r) for r in again)


def test_a_group_batch_is_each_members_own_batch_side_by_side(tmp_path):
    a = data.synthetic(n_train=300, n_test=10)
    x, y = a.train_x[:200], a.train_y[:200]
    mean = data.pixel_mean(x)
    loaders = [data.DeviceLoader(x, y, mean, batch_size=16, seed=s, device=torch.device("cpu")) for s in (0, 1, 2)]
    for it in (0, 5, 12, 13):  # 12 steps per epoch: 12 and 13 are the second epoch
        gx, gy = data.group_batch(loaders, it)
        assert gx.shape == (16, 9, 32, 32) and gy.shape == (16, 3)
        for k, loader in enumerate(loaders):
            bx, by = loader.batch(it)
            assert torch.equal(gx[:, 3 * k : 3 * k + 3], bx) and torch.equal(gy[:, k], by)
    alone = data.group_batch(loaders[1:2], 7)  # a group of one is the loader's own batch
    assert all(torch.equal(g, b) for g, b in zip(alone, (loaders[1].batch(7)[0], loaders[1].batch(7)[1][:, None])))
    other = data.DeviceLoader(x.clone(), y, mean, batch_size=16, seed=3, device=torch.device("cpu"))
    smaller = data.DeviceLoader(x, y, mean, batch_size=8, seed=3, device=torch.device("cpu"))
    smaller.x, smaller.mean = loaders[0].x, loaders[0].mean  # the same tensors, only the batch size differs
    for odd in (other, smaller):
        with pytest.raises(ValueError, match="^a group's loaders must share one training set, mean and batch size$"):
            data.group_batch([loaders[0], odd], 0)


def test_which_nets_a_group_can_hold():
    assert resnet.groupable("resnet20") and resnet.groupable("plain56", "a") and resnet.groupable("resnet8", "A")
    assert not resnet.groupable("resnet20", "B") and not resnet.groupable("preresnet20")
    assert not resnet.groupable("resnet18") and not resnet.groupable("resnet50")  # the ImageNet stem's
    assert resnet.groupable("cifar_resnet50")  # the CIFAR family's 6n+2 net at depth 50


def test_plan_groups_runs_of_one_shape():
    r = recipe("smoke")
    runs = [RunSpec(m, r, seed=s) for s in (0, 1, 2) for m in ("plain20", "resnet20", "plain32", "resnet32")]
    runs += [RunSpec("resnet110", r), RunSpec("preresnet20", r), RunSpec("resnet20", r, shortcut="B"),
             RunSpec("resnet20", r, seed=1, shortcut="B"), RunSpec("resnet18", r)]

    def names(groups):
        return [[f"{s.model}/{s.seed}" for s in g] for g in groups]

    assert names(fuse.plan(runs)) == [[f"{s.model}/{s.seed}"] for s in runs]  # auto, on the CPU: alone
    assert names(fuse.plan(runs, "auto", "cpu")) == [[f"{s.model}/{s.seed}"] for s in runs]
    assert names(fuse.plan(runs, "off", "cuda")) == [[f"{s.model}/{s.seed}"] for s in runs]
    auto = names(fuse.plan(runs, "auto", "cuda"))
    assert auto[:2] == [["plain20/0", "resnet20/0", "plain20/1", "resnet20/1", "plain20/2", "resnet20/2"],
                        ["plain32/0", "resnet32/0", "plain32/1", "resnet32/1", "plain32/2", "resnet32/2"]]
    assert auto[2:] == [["resnet110/0"], ["preresnet20/0"], ["resnet20/0"], ["resnet20/1"], ["resnet18/0"]]  # alone
    four = names(fuse.plan(runs, "4", "cpu"))
    assert four[:4] == [["plain20/0", "resnet20/0", "plain20/1", "resnet20/1"],
                        ["plain32/0", "resnet32/0", "plain32/1", "resnet32/1"],
                        ["plain20/2", "resnet20/2"], ["plain32/2", "resnet32/2"]]
    assert sorted(sum(four, [])) == sorted(sum(names(fuse.plan(runs, "off")), []))  # every run, once


def test_fuse_option_values():
    assert fuse.parse_fuse(" AUTO ") is None and fuse.parse_fuse("Off") == 1
    assert fuse.parse_fuse("1") == 1 and fuse.parse_fuse("12") == 12


@pytest.mark.parametrize("value", ["0", "-1", "many", "1.5", ""])
def test_fuse_option_refuses_what_is_not_a_group_size(value):
    with pytest.raises(ValueError, match="auto, off or a group size"):
        fuse.parse_fuse(value)


def test_a_group_of_different_shapes_is_refused_before_anything_is_written(tmp_path):
    r = recipe("smoke")
    a, b = RunSpec("resnet20", r), RunSpec("resnet32", r)
    with pytest.raises(ValueError) as e:
        run_group([a, b], tmp_path, CPU, progress=False)
    assert str(e.value) == ("a run group's runs must share family (CIFAR, post-activation, shortcut A), depth, width, "
                            f"data set and recipe; got {a.run_id}, {b.run_id}")
    with pytest.raises(ValueError, match="^a run group holds each run once$"):
        run_group([a, a], tmp_path, CPU, progress=False)
    with pytest.raises(ValueError, match="must share"):  # a net no group can hold, even with its own kind
        run_group([RunSpec("resnet20", r, shortcut="B"), RunSpec("resnet20", r, shortcut="B", seed=1)], tmp_path, CPU,
                  progress=False)
    assert not any(tmp_path.iterdir())


def test_a_member_taken_over_by_another_trainer_stops_and_the_others_go_on(trained, tmp_path, monkeypatch):
    out, specs, _, _ = trained
    real_beat = claims.Claim.beat

    def beat(self, interval_s):
        if self.run_id == specs[1].run_id:  # as if another sweep had found its heartbeat stale and taken it
            raise claims.Claimed(f"{self.run_id} was taken over")
        return real_beat(self, interval_s)

    monkeypatch.setattr(claims.Claim, "beat", beat)
    rows = run_group(specs, tmp_path, CPU, progress=False)
    assert isinstance(rows[1], claims.Claimed) and [rows[k]["status"] for k in (0, 2, 3)] == ["ok"] * 3
    assert records.recorded(tmp_path, specs[1].run_id) is None  # nothing written for the lost run
    assert not records.paths(tmp_path, specs[1].run_id)["ckpt"].exists()
    for k in (0, 2, 3):  # the others never noticed
        pd.testing.assert_frame_equal(_science(_curves(tmp_path, specs[k])), _science(_curves(out / "group", specs[k])))


def test_sweep_fuse_option_trains_groups_and_says_so(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main

    args = ["sweep", "--dataset", "synthetic", "--models", "plain,resnet", "--depths", "8", "--seeds", "0,1",
            "--width", "0.25", "--batch-size", "32", "--train-size", "128", "--val-size", "32", "--test-size", "32",
            "--iterations", "4", "--eval-every", "4", "--device", "cpu", "--out", str(tmp_path)]
    res = CliRunner().invoke(main, args + ["--fuse", "3"])
    assert res.exit_code == 0, res.output
    runs, _ = records.load(tmp_path)
    assert sorted(runs["group_size"]) == [1, 3, 3, 3] and runs["group_id"].nunique() == 2
    assert "4 to train on cpu in 2 fused group(s)" in res.output and "[4/4]" in res.output
    bad = CliRunner().invoke(main, args + ["--fuse", "none"])
    assert bad.exit_code == 2 and "must be auto, off or a group size" in bad.output


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("execution", ["eager", "cudagraph"])
def test_a_cuda_group_trains_like_its_members_alone(tmp_path, execution):
    """The GPU path (bf16, channels_last, the step in a CUDA graph): members against runs alone.
    bf16 rounding differs between grouped and single kernels, so the bounds are loose; a mixed-up
    member (data, gradient, mask) is far outside them."""
    ex = Execution.for_device("cuda", execution=execution)
    specs = _specs()
    rows = run_group(specs, tmp_path / "group", ex, progress=False)
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(r["group_size"] == 4 for r in rows)
    for s in specs:
        run_one(s, tmp_path / "alone", ex, progress=False)
        a, b = _curves(tmp_path / "alone", s), _curves(tmp_path / "group", s)
        assert (a["train_loss"] - b["train_loss"]).abs().max() < 0.05
        assert (a["test_err"] - b["test_err"]).abs().max() < 0.05


def test_members_at_different_iterations_train_one_after_another(tmp_path, interrupt):
    """A checkpoint at iteration 1 (one step per evaluation) is not mistaken for a fresh start."""
    specs = _two_steps()
    interrupt(specs[0], tmp_path, CPU)  # plain8 stopped at its first checkpoint (iteration 1)
    rows = run_group(specs, tmp_path, CPU, progress=False)
    assert [(r["status"], r["resumed_from"], r["group_size"]) for r in rows] == [("ok", 1, 1), ("ok", 0, 1)]
    assert [list(_curves(tmp_path, s)["iteration"]) for s in specs] == [[1, 2], [1, 2]]


def test_a_member_held_by_another_trainer_is_skipped_and_the_others_train(tmp_path):
    specs = _two_steps()
    held = claims.Claim(tmp_path, specs[0].run_id)
    held.acquire()  # this live process holds it, as another sweep would
    try:
        rows = run_group(specs, tmp_path, CPU, progress=False)
    finally:
        held.release()
    assert isinstance(rows[0], claims.Claimed) and (rows[1]["status"], rows[1]["group_size"]) == ("ok", 1)
    assert not records.paths(tmp_path, specs[0].run_id)["curves"].exists()


def test_a_group_that_raises_records_its_members_and_keeps_a_diverged_ones_record(tmp_path, tiny, monkeypatch):
    """A diverged member is written when it diverges; an exception later fails only the others."""
    from bench import sweep, train

    specs = [RunSpec(m, tiny, width=0.25, dataset="synthetic") for m in ("plain8", "resnet8")]
    real = data.group_batch

    def poisoned(loaders, it):
        x, y = real(loaders, it)
        x[0, 0, 0, 0] = float("nan")  # member 0 (channels 0..2)
        return x, y

    def boom(*a, **k):
        raise RuntimeError("evaluation exploded")

    monkeypatch.setattr(data, "group_batch", poisoned)
    monkeypatch.setattr(train, "evaluate", boom)
    lines = []
    sweep.run_local(specs, tmp_path, CPU, fuse="2", progress=False, log=lines.append)
    runs = records.load(tmp_path)[0].set_index("model")
    assert runs.loc["plain8", "status"] == "diverged" and runs.loc["plain8", "group_size"] == 2
    assert runs.loc["resnet8", "status"] == "failed" and "evaluation exploded" in runs.loc["resnet8", "error"]
    assert len(lines) == 2 and "failed" in lines[1]
    assert not list((tmp_path / "claims").glob("*.json"))  # both claims released


def test_a_pair_of_twins_trains_and_is_evaluated_as_one_group(tmp_path, tiny, interrupt):
    """Seed 0 of one depth is a pair (plain and residual twin): the he2015 grid's groups of two.
    Interrupted at its checkpoints, each member's checkpoint has its own net's shapes, and the pair resumes."""
    specs = [RunSpec(m, tiny, width=0.25, dataset="synthetic") for m in ("plain8", "resnet8")]
    interrupt(specs, tmp_path, CPU)
    for s in specs:
        ck = records.load_torch(records.paths(tmp_path, s.run_id)["ckpt"])
        alone = resnet.build(s.model, width=s.width)
        shapes = [tuple(p.shape) for p in alone.parameters()]
        own = {k: tuple(v.shape) for k, v in alone.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ck["model"].items()} == own
        assert [tuple(ck["optimizer"]["state"][i]["momentum_buffer"].shape) for i in range(len(shapes))] == shapes
        assert ck["optimizer"]["param_groups"][0]["params"] == list(range(len(shapes)))
    rows = run_group(specs, tmp_path, CPU, progress=False)
    assert [(r["status"], r["group_size"], r["resumed_from"]) for r in rows] == [("ok", 2, 8), ("ok", 2, 8)]
    assert all(0 <= r["final_test_err"] <= 1 for r in rows)
