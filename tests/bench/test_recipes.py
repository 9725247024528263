"""The recipe settings the methods' own papers use, each against a hand computation: input standardization,
per-location normalisation (dks's), mixup (Fixup's code), no weight decay on 1-D parameters (DiracNet's code)."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import resnet
from bench import checkpoints, data, fuse, records
from bench.specs import Execution, RunSpec, recipe
from bench.steps import TrainStep, make_optimizer, param_groups
from bench.train import run_one

CPU = torch.device("cpu")


def _images(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)


def test_standardize_is_per_channel_unit_variance_of_the_training_images():
    x = _images()
    norm = data.Norm.of("standardize", x)
    by_hand = [(x[:, c].double() / 255) for c in range(3)]
    assert torch.allclose(norm.mean.flatten(), torch.tensor([v.mean().item() for v in by_hand]).float())
    assert torch.allclose(norm.std.flatten(), torch.tensor([v.std(correction=0).item() for v in by_hand]).float())
    out = norm(x).double()
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3, dtype=torch.double), atol=1e-6)
    assert torch.allclose(out.std((0, 2, 3), correction=0), torch.ones(3, dtype=torch.double), atol=1e-5)
    # He et al.'s is the per-pixel mean image, unscaled, exactly as before
    pm = data.Norm.of("pixel-mean", x)
    assert pm.std is None and not pm.pln and torch.equal(pm(x), x.float().div(255).sub(x.float().mean(0).div(255)))
    with pytest.raises(ValueError, match="normalize must be"):
        data.Norm.of("zca", x)


def test_pln_is_dks_per_location_normalisation_with_a_homogeneous_coordinate():
    from dks.pytorch.data_preprocessing import per_location_normalization

    x = _images()
    norm = data.Norm.of("pln", x)
    out = norm(x)
    assert out.shape == (6, 4, 8, 8) and norm.channels(3) == 4
    theirs = per_location_normalization(norm.pixels(x).permute(0, 2, 3, 1), homog_mode="one").permute(0, 3, 1, 2)
    assert torch.allclose(out, theirs, atol=1e-6)
    assert torch.allclose(out.pow(2).mean(1), torch.ones(6, 8, 8), atol=1e-5)  # q = 1 at every location
    # after augmentation: a padded (zero) pixel is (0, 0, 0, 2), not the zero vector TAT's slopes dislike
    loader = data.DeviceLoader(x, torch.arange(6) % 3, norm, batch_size=6, seed=0, device=CPU)
    batch, _ = loader.batch(0)
    assert batch.shape[1] == 4 and torch.allclose(batch.pow(2).mean(1), torch.ones(6, 8, 8), atol=1e-5)


def test_mixup_batches_are_a_pure_function_of_seed_and_step_and_mix_images_and_targets_alike():
    x, y = _images(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    mk = lambda seed: data.DeviceLoader(x, y, data.pixel_mean(x), batch_size=4, seed=seed, device=CPU,  # noqa: E731
                                        mixup=1.0, num_classes=4, augment=False)
    plain = data.DeviceLoader(x, y, data.pixel_mean(x), batch_size=4, seed=0, device=CPU, augment=False)
    a, b = mk(0), mk(0)
    xa, ta = a.batch(3)
    xb, tb = b.batch(3)
    assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert not torch.equal(mk(1).batch(3)[1], ta) or not torch.equal(mk(1).batch(3)[0], xa)
    xp, yp = plain.batch(3)  # the same batch unmixed
    assert ta.shape == (4, 4) and torch.allclose(ta.sum(1), torch.ones(4))
    # each image is lam x itself + (1 - lam) x one partner, its target mixed with the same partner and weight,
    # and the partners are a permutation of the batch (lam read off a row whose partner has another label)
    mixed = [i for i in range(4) if ta[i].max() < 1 - 1e-6]
    lam = float(ta[mixed[0], yp[mixed[0]]])
    onehot = F.one_hot(yp, 4).float()
    partners = [next(j for j in range(4) if torch.allclose(xa[i], lam * xp[i] + (1 - lam) * xp[j], atol=1e-5)
                     and torch.allclose(ta[i], lam * onehot[i] + (1 - lam) * onehot[j])) for i in range(4)]
    assert sorted(partners) == [0, 1, 2, 3] and 0 < lam < 1
    # Beta(1, 1) is uniform: the weights of many steps spread over (0, 1)
    distinct = data.DeviceLoader(x, torch.arange(8), data.pixel_mean(x), batch_size=8, seed=0, device=CPU, mixup=1.0)
    lams = [distinct.mix(i, xp.repeat(2, 1, 1, 1), torch.arange(8))[1].diagonal().min().item() for i in range(300)]
    assert 0.4 < sum(lams) / 300 < 0.6 and min(lams) < 0.1 and max(lams) > 0.9


def test_under_mixup_the_loss_and_error_are_each_targets_weighted_ones():
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 3)
    x, y_a, y_b, lam = torch.randn(4, 5), torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2]), 0.7
    target = lam * F.one_hot(y_a, 3).float() + (1 - lam) * F.one_hot(y_b, 3).float()
    opt = make_optimizer(net, 0.0, 0.0, 0.0, CPU)
    step = TrainStep(net, opt)
    with torch.no_grad():
        logits = net(x)
    step(x, target)
    loss, err, n = step.read()
    # Fixup's cifar_train.py: lam CE(y_a) + (1 - lam) CE(y_b); correct = lam [pred = y_a] + (1 - lam) [pred = y_b]
    want_loss = lam * F.cross_entropy(logits, y_a) + (1 - lam) * F.cross_entropy(logits, y_b)
    pred = logits.argmax(1)
    correct = (lam * (pred == y_a).float() + (1 - lam) * (pred == y_b).float()).sum()
    assert loss == pytest.approx(want_loss.item(), rel=1e-5) and err == pytest.approx(1 - correct.item() / 4)
    assert n == 4
    step(x, y_a)  # hard labels still count whole errors
    assert step.read()[1] == pytest.approx((pred != y_a).float().mean().item())


def test_without_decay_1d_every_one_dimensional_parameter_trains_without_weight_decay():
    net = resnet.build("dirac14", width=0.25)
    groups = param_groups(net, decay_1d=False)
    decayed, free = groups[0]["params"], groups[1]["params"]
    assert groups[1]["weight_decay"] == 0.0 and "weight_decay" not in groups[0]
    names = {id(p): n for n, p in net.named_parameters()}
    assert {names[id(p)] for p in free} == {n for n, p in net.named_parameters() if p.dim() == 1}
    assert any(n.endswith(".a") for n in map(names.get, map(id, free))) and all(p.dim() > 1 for p in decayed)
    assert len(param_groups(net)) == 1  # the shared recipe: decay on everything
    # Fixup's scalars (all 1-D, the classifier's bias too) keep their lr / 10 without decay; its convs decay
    fix = param_groups(resnet.build("fixup14", width=0.25), ((r"bias|scale", 0.1),), decay_1d=False)
    assert [(g["lr_scale"], g.get("weight_decay"), {p.dim() for p in g["params"]}) for g in fix] == [
        (1.0, None, {2, 4}), (0.1, 0.0, {1})]
    # an SGD step with weight decay leaves a 1-D parameter with zero gradient where it was
    opt = make_optimizer(net, 0.1, 0.0, 0.5, CPU, decay_1d=False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in net.named_parameters():
        assert torch.equal(p, before[n]) == (p.dim() == 1), n


def test_runs_of_these_settings_train_alone_and_record_them(tmp_path):
    r = recipe("smoke", batch_size=16, iterations=4, eval_every=2, train_size=64, val_size=32, test_size=32)
    for settings in (dict(mixup=1.0), dict(normalize="pln"), dict(decay_1d=False)):
        assert fuse.group_key(RunSpec("resnet8", replace(r, **settings))) is None, settings
    assert fuse.group_key(RunSpec("resnet8", replace(r, normalize="standardize"))) is not None
    ex = Execution.for_device("cpu")
    for model, settings in (("tat14", dict(normalize="pln")), ("fixup8", dict(normalize="standardize", mixup=1.0))):
        spec = RunSpec(model, replace(r, **settings), width=0.25, dataset="synthetic")
        row = run_one(spec, tmp_path, ex, progress=False)
        assert row["status"] == "ok" and row["method_recipe"] == "paper", model
        assert all(row[k] == v for k, v in settings.items())
        saved = checkpoints.load_torch(records.paths(tmp_path, spec.run_id)["weights"])
        assert saved["in_channels"] == (4 if settings.get("normalize") == "pln" else 3)


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_the_fixup_preset_follows_its_script_and_its_report_puts_each_net_beside_its_papers(tmp_path):
    from click.testing import CliRunner

    from bench.cli import main
    from bench.report import build_report
    from bench.specs import PRESETS, RECIPES

    # hongyi-zhang/Fixup, cifar/cifar_train.py's defaults, by hand
    r = RECIPES["fixup2019"]
    assert (r.batch_size, r.lr, r.momentum, r.weight_decay, r.iterations, r.milestones, r.schedule_in) == \
        (128, 0.1, 0.9, 1e-4, 200, (100, 150), "epochs")
    assert (r.mixup, r.normalize, r.val_size, r.warmup_iters, r.decay_1d) == (1.0, "standardize", 0, 0, True)
    assert PRESETS["fixup2019"]["models"] == ("resnet", "fixup", "rezero") and PRESETS["fixup2019"]["depths"] == (56, 110)
    # the short form: three epochs of 64 images at width 0.25 (12 steps: the synthetic images' colours are learnt),
    # at depth 8 (the preset's 56 and 110 are a GPU's work)
    out = tmp_path / "f"
    res = CliRunner().invoke(main, ["sweep", "--preset", "fixup2019", "--depths", "8", "--dataset", "synthetic",
                                    "--width", "0.25", "--iterations", "3", "--batch-size", "16", "--train-size", "64",
                                    "--test-size", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    runs, _ = records.load(out)
    assert sorted(runs["model"]) == ["fixup8", "resnet8", "rezero8"] and (runs["iterations_done"] == 12).all()
    assert set(runs["method_recipe"]) == {"paper", "matched"} and (runs["mixup"] == 1.0).all()
    rep = build_report(out, tmp_path / "rep", responses=False)
    assert any("mixed batches" in n for n in rep.notes)  # the training errors on mixed batches are said to be so
    # beside the papers: the runs at the published depth (56), as the preset trains them, moved there by hand
    from bench.report import _runs_frame, published_methods_table

    at56 = _runs_frame(runs.assign(depth=56))
    pub = published_methods_table(at56).set_index("net")
    assert set(pub.index) == {"resnet", "fixup", "rezero"} and (pub["depth"] == 56).all()
    trained = at56.set_index("kind")["outcome"] == "trained"
    for kind in pub.index:
        mean = 100 * runs.loc[runs["kind"] == kind, "final_test_err"].iloc[0]
        assert pub.loc[kind, "ours - published"] == (f"{mean - pub.loc[kind, 'published test err %']:+.2f}"
                                                      if trained[kind] else "-")
