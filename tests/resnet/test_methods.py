"""Degradation fixes side by side (resnet.methods, resnet.tat): each method's defining property at
initialisation, its parameter groups, its lesions, and the registry that finds them all.

Each property test names what its paper (or official code) says; planting the property wrong (a
gate bias of 0, a Fixup branch conv left at He's scale, a nonzero classifier, alpha = 1, a He-normal
TAT conv, a slope other than dks's) makes it fail.
"""
import math

import pytest
import torch

import torch.nn.functional as F
from torch import nn

from bench import probes
import resnet
from resnet.methods import DiracConv, FixupBlock, HighwayBlock, ReZeroBlock, SkipInitBlock
from resnet.tat import TATBlock, TailoredReLU

# every registered method (not He et al.'s own kinds), from the registry as timm's tests read list_models(): a
# method registered later is tested without this file naming it
METHODS = tuple(k for k in resnet.kinds() if not resnet.method(k).baseline and not resnet.method(k).package)
assert set(METHODS) >= {"highway", "fixup", "skipinit", "rezero", "dirac", "tat"}  # the registry loaded them


def _net(name, seed=0, **kw):
    torch.manual_seed(seed)
    return resnet.build(name, **kw)


@pytest.mark.parametrize("kind", METHODS)
def test_each_method_is_a_family_at_every_cifar_depth(kind):
    """Built like resnet{d}/plain{d}: He et al.'s CIFAR topology, every 6n+2 depth, any width and data set."""
    for depth in (14, 20):
        net = _net(f"{kind}{depth}", width=0.5)
        assert len(resnet.blocks(net)) == 3 * (depth - 2) // 6
        y = net(torch.randn(4, 3, 32, 32))
        assert y.shape == (4, 10) and torch.isfinite(y).all()
    one = _net(f"{kind}14", num_classes=7, in_channels=1, width=0.25)
    assert one(torch.randn(2, 1, 28, 28)).shape == (2, 7)  # Fashion-MNIST's shape
    spec = resnet.parse(f"{kind}56")
    assert spec.family == "cifar" and spec.kind == kind and spec.method is resnet.method(kind)
    assert spec.residual == (kind in ("highway", "fixup", "skipinit", "rezero"))
    with pytest.raises(ValueError, match="invalid depth"):
        resnet.parse(f"{kind}21")


def test_every_kind_is_a_family_of_one_registry():
    """He et al.'s four are registered like the methods (first, and as the report's plain/residual baselines);
    nothing else keeps a list of kinds, and a plugin can neither take their names nor the cifar_ prefix."""
    from resnet.registry import Family, register

    assert resnet.kinds()[:4] == resnet.baseline_kinds() == ["resnet", "plain", "preresnet", "preplain"]
    assert set(METHODS) <= set(resnet.kinds()) and not any(resnet.method(k).baseline for k in METHODS)
    he = resnet.method("plain")
    assert isinstance(he, Family) and (he.residual, he.shortcuts, he.imagenet) == (False, ("A", "B", "C"), True)
    assert resnet.method("preresnet").paper == "He et al. 2016, Identity Mappings" and not resnet.method("preplain").imagenet
    with pytest.raises(ValueError, match="'resnet' is already registered"):
        register(Family("resnet", resnet.method("fixup").build, residual=True, normalization="none", paper="x"))
    with pytest.raises(ValueError, match="not starting with cifar_"):
        Family("cifar_mine", resnet.method("fixup").build, residual=True, normalization="none", paper="x")
    # their run_ids are those of earlier versions (the committed records resume): nothing of the family is hashed
    from bench.specs import RunSpec, recipe

    assert RunSpec("resnet20", recipe("he2015")).run_id == "resnet20-cifar10-he2015-s0-630ae4f7cc"
    assert RunSpec("preresnet110", recipe("he2015")).run_id == "preresnet110-cifar10-he2015-s0-a95d283433"
    assert RunSpec("resnet18", recipe("he2015")).run_id == "resnet18-cifar10-he2015-s0-6bfcd035a8"


def test_a_method_block_takes_only_option_a_and_its_familys_shortcut_path():
    """The methods' blocks share BranchBlock: the net's residual flag decides the shortcut, not each block."""
    from resnet.methods import DiracBlock

    assert ReZeroBlock(4, 8, 2, residual=True).shortcut is not None
    assert ReZeroBlock(4, 8, 2, residual=False).shortcut is None
    assert DiracBlock(4, 8, 2, residual=False).shortcut is None and not DiracBlock(4, 4, residual=False).residual
    with pytest.raises(ValueError, match="option A only, got 'B'"):
        FixupBlock(4, 8, 2, residual=True, shortcut="B")


@pytest.mark.parametrize("kind", ["fixup", "skipinit", "rezero"])
def test_a_scalar_initialised_net_at_init_computes_exactly_its_shortcut_path(kind):
    """alpha = 0 (SkipInit, ReZero) or a zero last conv (Fixup): every branch adds exactly 0, so the net
    is, bit for bit, the net with every block deleted (what each block's deleted() says is left)."""
    net = _net(f"{kind}20", width=0.5).eval()
    x = torch.randn(4, 3, 32, 32)
    everything = resnet.lesioned(net, range(len(resnet.blocks(net))))
    assert torch.equal(_features(net, x), _features(everything, x))  # (Fixup's zero classifier: compare before it)
    assert _features(net, x).abs().sum() > 0
    with torch.no_grad():  # planted: a branch that adds something
        for b in resnet.blocks(net):
            (b.scale if kind == "fixup" else b.alpha).fill_(1.0)
            if kind == "fixup":
                b.conv2.weight.normal_()
    assert not torch.equal(_features(net, x), _features(everything, x))


def _features(net, x):
    """What the classifier sees: the pooled output of the last stage."""
    return net.pool(net.final(net.stages(net.stem(x))))


def test_fixup_initialisation_is_the_papers_and_its_codes():
    """Zhang et al. 2019 (hongyi-zhang/Fixup): no BN; each branch's last conv and the classifier zero;
    the other branch conv He-normal (fan_out) times L^(-1/(2m-2)), L = 27 blocks of m = 2 layers for
    depth 56; scalar biases 0 and multipliers 1; everything named bias or scale trains at lr / 10."""
    net = _net("fixup56")
    blocks = resnet.blocks(net)
    assert len(blocks) == 27 and all(isinstance(b, FixupBlock) for b in blocks)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    assert torch.equal(net.fc.weight, torch.zeros_like(net.fc.weight)) and torch.equal(net.fc.bias, torch.zeros(10))
    for b in blocks:
        assert torch.equal(b.conv2.weight, torch.zeros_like(b.conv2.weight))
        assert [p.item() for p in (b.bias1a, b.bias1b, b.bias2a, b.bias2b, b.scale)] == [0, 0, 0, 0, 1]
    convs = torch.cat([b.conv1.weight.detach().flatten() / math.sqrt(2 / (b.conv1.weight.shape[0] * 9)) for b in blocks])
    assert float(convs.std()) == pytest.approx(27 ** -0.5, rel=0.02) and abs(float(convs.mean())) < 0.005
    assert resnet.lr_scales("fixup56") == ((r"bias|scale", 0.1),)
    from bench.steps import make_optimizer, set_lr

    opt = make_optimizer(net, 0.1, 0.9, 1e-4, torch.device("cpu"), lr_scales=resnet.lr_scales("fixup56"))
    names = {id(p): n for n, p in net.named_parameters()}
    main, scalars = opt.param_groups
    assert main["lr"] == 0.1 and scalars["lr"] == pytest.approx(0.01) and scalars["lr_scale"] == 0.1
    assert {names[id(p)].rsplit(".", 1)[-1] for p in scalars["params"]} == {"bias1a", "bias1b", "bias2a", "bias2b",
                                                                             "scale", "bias1", "bias"}
    assert "fc.bias" in {names[id(p)] for p in scalars["params"]}  # their code's 'bias' in the name: the head's too
    assert all("bias" not in names[id(p)] and "scale" not in names[id(p)] for p in main["params"])
    set_lr(opt, 0.001)  # a milestone moves both groups together
    assert (main["lr"], scalars["lr"]) == (0.001, pytest.approx(0.0001))


def test_fixup_has_residual56s_convolutions_and_a_handful_of_scalars_instead_of_bn():
    """Parameters by hand: the same convs and classifier as resnet56; no BN's 2 x channels per layer;
    5 scalars per block, the stem's bias and the head's."""
    res, fix = _net("resnet56"), _net("fixup56")
    bn = sum(m.weight.numel() + m.bias.numel() for m in res.modules() if isinstance(m, nn.BatchNorm2d))
    assert resnet.count_params(fix) == resnet.count_params(res) - bn + 5 * 27 + 2


def test_skipinit_and_rezero_branches_end_in_a_zero_scalar():
    skip, rz = _net("skipinit20"), _net("rezero20")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in skip.modules())  # SkipInit: no BN
    assert any(isinstance(m, nn.BatchNorm2d) for m in rz.modules())  # ReZero's CIFAR ResNet keeps it
    for b in resnet.blocks(skip):
        assert isinstance(b, SkipInitBlock) and b.alpha.item() == 0.0
    for b in resnet.blocks(rz):
        assert isinstance(b, ReZeroBlock) and b.alpha.item() == 0.0
    # ReZero adds after the nonlinearity (no ReLU after the addition): a negative input stays negative
    block = ReZeroBlock(4, 4)
    x = -torch.ones(1, 4, 8, 8)
    assert torch.equal(block.eval()(x), x)


def test_highway_gates_start_biased_towards_carrying():
    """Srivastava et al. 2015, sec. 2.2: the transform gate's bias starts negative (-1, the first of their
    example values), so each block starts close to its carry path; T = sigmoid(conv(x) + b)."""
    net = _net("highway20")
    assert resnet.method("highway").params == {"gate_bias": -1.0}
    gates = [b.gate for b in resnet.blocks(net)]
    assert all(isinstance(b, HighwayBlock) for b in resnet.blocks(net))
    assert all(torch.equal(g.bias, torch.full_like(g.bias, -1.0)) for g in gates)
    block = resnet.blocks(net)[0].eval()
    x = torch.rand(2, 16, 32, 32)
    with torch.no_grad():
        block.gate.weight.zero_()  # T = sigmoid(-1) everywhere
        h = F.relu(block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x))))))
        t = torch.sigmoid(torch.tensor(-1.0))
        torch.testing.assert_close(block(x), h * t + x * (1 - t))
        assert torch.equal(block.deleted()(x), x)  # deleted: the carry path (T = 0)


def test_dirac_convs_start_as_the_identity_plus_a_tenth_of_a_normalised_kernel():
    """Zagoruyko and Komodakis 2017 (szagoruyko/diracnets): W_hat = diag(a) I + diag(b) W / ||W||, a = 1,
    b = 0.1; no shortcut; a stride-2 conv's delta subsamples and leaves the new channels zero (option A)."""
    net = _net("dirac20")
    convs = [m for m in net.modules() if isinstance(m, DiracConv)]
    assert len(convs) == 18 and not any(b.residual for b in resnet.blocks(net))
    for c in convs:
        assert torch.equal(c.a, torch.ones_like(c.a)) and torch.allclose(c.b, torch.full_like(c.b, 0.1))
        w = F.normalize(c.weight.flatten(1)).view_as(c.weight)
        torch.testing.assert_close(c.effective_weight(), c.delta + 0.1 * w)
    down = next(c for c in convs if c.stride == (2, 2))
    x = torch.randn(2, down.in_channels, 16, 16)
    with torch.no_grad():
        down.b.zero_()
    out = down(x)
    assert torch.equal(out[:, : down.in_channels], x[:, :, ::2, ::2]) and not out[:, down.in_channels:].any()


def _dks_slope(layers, target=0.9):
    """TAT's leaky-ReLU slope for a chain of ``layers`` nonlinear layers, straight from dks."""
    from dks.pytorch.activation_transform import get_transformed_activations

    def chain(x, f):
        for _ in range(layers):
            x = f(x)
        return x

    act = get_transformed_activations(["leaky_relu"], method="TAT", tat_params={"c_val_0_target": target},
                                      subnet_max_func=chain)["leaky_relu"]
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    return act, x


@pytest.mark.parametrize("depth", [20, 44])
def test_a_tat_nets_activation_is_the_one_dks_solves_for_its_depth(depth):
    """Zhang, Botev, Martens 2022: every activation is dks's transformed leaky ReLU for the whole net's
    depth (a chain of depth - 1 nonlinear layers) and C(0) = 0.9; deeper nets get larger slopes."""
    pytest.importorskip("dks")
    net = _net(f"tat{depth}")
    acts = [m for m in net.modules() if isinstance(m, TailoredReLU)]
    assert len(acts) == depth - 1
    act, x = _dks_slope(depth - 1)
    for a in acts:
        torch.testing.assert_close(a(x), act(x).to(x.dtype), rtol=1e-6, atol=1e-7)
    assert net.derived["negative_slope"] == pytest.approx(acts[0].slope)
    assert acts[0].slope > 0 and (depth == 20 or acts[0].slope > _net("tat20").derived["negative_slope"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()) and not any(b.residual for b in resnet.blocks(net))


def test_tat_convs_are_delta_orthogonal_with_zero_biases():
    """dks's Delta initialisation: zero but the kernel's centre, an orthogonal matrix there (scaled by
    sqrt(in / out) where a conv narrows, which none here does); biases zero."""
    pytest.importorskip("dks")
    net = _net("tat20")
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    for c in convs:
        w = c.weight
        centre = w[:, :, 1, 1]
        assert torch.equal(w.sum((2, 3)) - centre, torch.zeros_like(centre))  # nothing off the centre
        assert (w[:, :, 0].abs().sum(), w[:, :, 2].abs().sum()) == (0, 0)
        gram = centre.T @ centre if centre.shape[0] >= centre.shape[1] else centre @ centre.T
        torch.testing.assert_close(gram, torch.eye(len(gram)), rtol=1e-4, atol=1e-5)
        assert torch.equal(c.bias, torch.zeros_like(c.bias))
    assert all(isinstance(b, TATBlock) for b in resnet.blocks(net))


def test_tat_refuses_a_depth_its_target_cannot_reach():
    pytest.importorskip("dks")
    with pytest.raises(ValueError, match=r"TAT cannot reach its target C\(0\) = 0.9 with 7 leaky-ReLU layers \(depth 8\)"):
        resnet.build("tat8")


@pytest.mark.parametrize("kind,left", [("highway", "carry"), ("fixup", "relu"), ("skipinit", "relu"),
                                       ("rezero", "shortcut"), ("dirac", "identity"), ("tat", "identity")])
def test_a_deleted_block_is_what_its_paper_leaves(kind, left):
    net = _net(f"{kind}14", width=0.5).eval()
    blocks = resnet.blocks(net)
    x = torch.randn(2, blocks[0].cin, 32, 32)
    kept = blocks[0].deleted()(x)  # the first block keeps its shape: every kind can lose it
    expect = F.relu(x) if left == "relu" else x
    assert torch.equal(kept, expect)
    second = [i for i, b in enumerate(blocks) if b.changes_shape()][0]
    assert resnet.deletable(blocks[second]) == resnet.parse(f"{kind}14").residual


def test_methods_records_say_what_each_run_was():
    from bench.specs import RunSpec, recipe

    r = recipe("smoke")
    fix, res = RunSpec("fixup20", r), RunSpec("resnet20", r)
    row = fix.flat()
    assert (row["method"], row["normalization"], row["residual"], row["plugin"]) == ("fixup", "none", True, None)
    assert row["lr_scales"] == '[["bias|scale", 0.1]]' and row["method_params"] == "{}"
    assert RunSpec("highway20", r).flat()["method_params"] == '{"gate_bias": -1.0}'
    assert "method" not in res.identity() and res.flat()["normalization"] == "bn"  # He et al.'s: run_ids unchanged
    assert res.run_id == "resnet20-cifar10-smoke-s0-" + res.run_id.rsplit("-", 1)[1]
    assert fix.identity()["method"] == {"lr_scales": [["bias|scale", 0.1]]}


@pytest.mark.parametrize("kind", METHODS)
def test_every_diagnostic_runs_on_every_method(kind):
    """Lesions, shattered gradients (with BN calibrated where there is BN), per-layer rows and backward
    signals: the same measures for every family."""
    from bench.analysis import calibrate_bn, lesion_errors, shattered
    from bench.fuse import Members

    net = _net(f"{kind}14", width=0.25)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))
    mean = torch.full((3, 32, 32), 0.5)
    calibrate_bn(net, [x.float() / 255 - mean])
    rows = lesion_errors(net, x, y, mean, seed=0, draws=2)
    positions = {r["position"] for r in rows}
    assert positions == ({"none", "same", "downsampling"} if resnet.parse(f"{kind}14").residual else {"none", "same"})
    corr = shattered(net, x, mean, images=2, steps=4)
    assert len(corr) == 10 and all(abs(r["correlation"]) <= 1 + 1e-9 for r in corr if kind != "fixup")
    if kind == "fixup":  # its classifier starts at zero: no input gradient, no correlation (NaN, not 0)
        assert all(r["correlation"] != r["correlation"] for r in corr)
    members = Members([net])
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    torch.nn.functional.cross_entropy(net(x.float() / 255 - mean), y).backward()
    opt.step()
    layers = probes.layer_rows(members, opt, {0: "r"}, 1)[0]
    assert len(layers) == len(members.layers) and all(math.isfinite(r["grad_x_weight"]) for r in layers)
    signals = probes.signal_rows(members, [(x.float() / 255 - mean, y)], False, {0: "r"}, 1)[0]
    assert [r["block"] for r in signals] == list(range(1, 7)) and all(r["signal_rms"] > 0 for r in signals)
