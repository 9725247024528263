"""The networks: shapes, gradients, plain/residual twins, He et al. Table 6, bad names."""
import pytest
import torch

import resnet

# a few depths per family; small widths keep the deep ones fast on 2 CPU cores
CASES = [
    ("resnet8", {}), ("plain8", {}), ("resnet20", {}), ("plain20", {}), ("resnet56", {"width": 0.25}),
    ("preresnet20", {}), ("preplain20", {}), ("preresnet110", {"width": 0.25}),
    ("resnet18", {"width": 0.125}), ("plain18", {"width": 0.125}), ("resnet34", {"width": 0.125}),
    ("resnet50", {"width": 0.125}), ("plain50", {"width": 0.125}), ("resnet101", {"width": 0.0625}),
    ("cifar_resnet50", {"width": 0.25}), ("cifar_plain152", {"width": 0.125}),
    ("resnet20", {"shortcut": "B"}), ("resnet20", {"shortcut": "C"}), ("preresnet20", {"shortcut": "B"}),
    ("resnet18", {"width": 0.125, "stem": "imagenet"}),
]


@pytest.mark.parametrize("name,opts", CASES)
def test_shape_and_gradient_reaches_every_parameter(name, opts):
    torch.manual_seed(0)
    net = resnet.build(name, num_classes=7, **opts)
    size = 64 if opts.get("stem") == "imagenet" else 32
    out = net(torch.randn(4, 3, size, size))
    assert out.shape == (4, 7)
    out.square().mean().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("depth", [8, 20, 56, 110])
@pytest.mark.parametrize("pre", ["", "pre"])
def test_plain_twin_matches_names_and_counts_under_option_a(depth, pre):
    res, plain = resnet.build(f"{pre}resnet{depth}"), resnet.build(f"{pre}plain{depth}")
    r = {n: p.shape for n, p in res.named_parameters()}
    p = {n: q.shape for n, q in plain.named_parameters()}
    assert r == p
    assert resnet.count_macs(res) == resnet.count_macs(plain)


def test_plain_twin_under_projection_lacks_only_the_shortcuts():
    res, plain = resnet.build("resnet20", shortcut="B"), resnet.build("plain20", shortcut="B")
    extra = set(dict(res.named_parameters())) - set(dict(plain.named_parameters()))
    assert extra and all(".shortcut." in n for n in extra)
    assert set(dict(plain.named_parameters())) <= set(dict(res.named_parameters()))


def test_plain_twin_computes_the_same_branch_without_the_addition():
    torch.manual_seed(0)
    res = resnet.build("resnet8").eval()
    plain = resnet.build("plain8").eval()
    plain.load_state_dict(res.state_dict())
    x = torch.randn(2, 3, 32, 32)
    # same weights, but the addition changes the function
    assert not torch.allclose(res(x), plain(x))
    for blk in res.modules():
        if hasattr(blk, "residual"):
            blk.residual = False
    assert torch.allclose(res(x), plain(x))


# He et al. 2015, Table 6 (params) and the multiply-adds of these nets on a 32x32 input
TABLE6 = {20: (0.27e6, 40.6e6), 32: (0.46e6, 68.9e6), 44: (0.66e6, 97.2e6), 56: (0.85e6, 125.5e6), 110: (1.7e6, 252.9e6)}


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_table6_params_and_macs(depth):
    params, macs = TABLE6[depth]
    net = resnet.build(f"resnet{depth}")
    assert resnet.count_params(net) == pytest.approx(params, rel=0.03)  # the paper rounds to 2 digits
    assert resnet.count_macs(net) == pytest.approx(macs, rel=0.01)


def test_table6_resnet1202_params():
    assert resnet.count_params(resnet.build("resnet1202")) == pytest.approx(19.4e6, rel=0.01)


def test_seed_resnet18_params():
    assert resnet.count_params(resnet.build("resnet18")) == 11_173_962


def test_width_multiplier_scales_cifar_filters():
    net = resnet.build("resnet20", width=0.5)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(set(convs)) == [8, 16, 32]


def test_zero_init_residual_makes_blocks_start_as_identity():
    net = resnet.build("resnet20", zero_init_residual=True)
    assert all((b.bn2.weight == 0).all() for b in net.stages.modules() if hasattr(b, "bn2"))
    plain = resnet.build("plain20", zero_init_residual=True)  # ignored by plain twins
    assert all((b.bn2.weight == 1).all() for b in plain.stages.modules() if hasattr(b, "bn2"))


def test_in_channels_for_grayscale():
    assert resnet.build("resnet8", in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_parse_and_available():
    assert resnet.parse("resnet50").family == "imagenet"
    assert resnet.parse("cifar_resnet50") == resnet.ModelName("cifar_resnet50", "cifar", "resnet", 50)
    assert resnet.parse("preplain110").residual is False
    names = resnet.available()
    assert {"resnet20", "plain56", "preresnet110", "resnet18", "plain152", "cifar_plain50"} <= set(names)
    for name in names:
        resnet.parse(name)


@pytest.mark.parametrize("name", ["resnet21", "plain7", "preresnet18", "plain2", "resnet0"])
def test_invalid_depth_says_6n_plus_2(name):
    with pytest.raises(ValueError, match=r"6n\+2.*20, 32, 44"):
        resnet.build(name)


@pytest.mark.parametrize("name", ["vgg16", "resnet", "plainnet", "", "resnet-20"])
def test_unknown_family_lists_families(name):
    with pytest.raises(ValueError, match="known families: resnet"):
        resnet.build(name)


@pytest.mark.parametrize("opts,match", [
    ({"num_classes": 0}, "num_classes"), ({"width": 0}, "width"), ({"width": -1.0}, "width"),
    ({"shortcut": "D"}, "shortcut"), ({"stem": "huge"}, "stem"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        resnet.build("resnet18" if "stem" in opts else "resnet20", **opts)
