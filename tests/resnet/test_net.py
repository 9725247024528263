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


# He et al. 2015, Table 6: parameters (the table gives no multiply-adds)
TABLE6 = {20: 0.27e6, 32: 0.46e6, 44: 0.66e6, 56: 0.85e6, 110: 1.7e6}


def _cifar_macs(n: int) -> int:
    """Multiply-adds of a 6n+2 CIFAR net on a 32x32 image, by hand: a 3x3 conv makes H x W x C_out outputs
    of 9 x C_in products each. The stem (3 -> 16 at 32x32); 2n convs 16 -> 16 at 32x32; at 16x16 one
    16 -> 32 conv (stride 2) and 2n - 1 convs 32 -> 32; at 8x8 one 32 -> 64 and 2n - 1 convs 64 -> 64;
    the head 64 -> 10. Every conv but the stem and the two downsampling ones costs 32*32*16*16*9."""
    same = 32 * 32 * 16 * 16 * 9
    return 32 * 32 * 16 * 3 * 9 + 2 * n * same + 2 * (16 * 16 * 32 * 16 * 9 + (2 * n - 1) * same) + 64 * 10


@pytest.mark.parametrize("depth", sorted(TABLE6))
def test_table6_params_and_macs(depth):
    net = resnet.build(f"resnet{depth}")
    assert resnet.count_params(net) == pytest.approx(TABLE6[depth], rel=0.03)  # the paper rounds to 2 digits
    assert resnet.count_macs(net) == _cifar_macs((depth - 2) // 6)  # and our count, against the hand count
    assert _cifar_macs(3) == 40_551_040  # ResNet-20: 40.6M multiply-adds


def test_table6_resnet1202_params():
    assert resnet.count_params(resnet.build("resnet1202")) == pytest.approx(19.4e6, rel=0.01)


def test_seed_resnet18_params():
    assert resnet.count_params(resnet.build("resnet18")) == 11_173_962


def test_cifar_resnet8_layer_by_layer():
    """He et al. 2015, sec. 4.2 with n = 1: a 3x3 stem of 16 filters, then 16, 32, 64 filters on 32, 16, 8
    maps (stride 2 at the first conv of stages 2 and 3), bias-free 3x3 convs padded by 1, one linear layer."""
    def convs(net):
        return [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0], m.bias is None)
                for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    c3 = lambda i, o, s=1: (i, o, 3, s, 1, True)  # noqa: E731
    paper = [c3(3, 16), c3(16, 16), c3(16, 16), c3(16, 32, 2), c3(32, 32), c3(32, 64, 2), c3(64, 64)]
    for name in ("resnet8", "plain8", "preresnet8"):
        net = resnet.build(name)
        assert convs(net) == paper, name
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 7, name  # pre-act: one after the last block
        assert (net.fc.in_features, net.fc.out_features) == (64, 10)
    assert [type(m) for m in resnet.build("resnet8").stem] == [torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.ReLU]
    assert [type(m) for m in resnet.build("preresnet8").stem] == [torch.nn.Conv2d]  # its first block normalises
    # option B: a strided 1x1 projection where the shape changes, nowhere else
    assert convs(resnet.build("resnet8", shortcut="B")) == paper[:5] + [(16, 32, 1, 2, 0, True)] + paper[5:] + [
        (32, 64, 1, 2, 0, True)]
    assert [resnet.cifar.scaled(c, w) for c, w in ((16, 0.3), (16, 0.01), (64, 0.5))] == [5, 1, 32]  # rounded, >= 1


def test_width_multiplier_scales_cifar_filters():
    net = resnet.build("resnet20", width=0.5)
    convs = [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sorted(set(convs)) == [8, 16, 32]


def test_initialisation_is_he_et_al_2015s():
    """Convs: He et al. (2015b) normal init by fan-out, std = sqrt(2 / (out channels * 3 * 3)); BN: gamma 1,
    beta 0. The stem (3 -> 16) and the stage transitions (16 -> 32) tell fan-out from fan-in."""
    torch.manual_seed(0)
    net = resnet.build("resnet56")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in (convs[0], next(c for c in convs if c.in_channels == 16 and c.out_channels == 32)):
        w = conv.weight.detach()
        want = (2 / (conv.out_channels * 9)) ** 0.5
        assert abs(float(w.mean())) < 0.2 * want and float(w.std()) == pytest.approx(want, rel=0.15)
    stds = [float(c.weight.detach().std()) / (2 / (c.out_channels * 9)) ** 0.5 for c in convs]
    assert 0.9 < sum(stds) / len(stds) < 1.1  # over all 55 convs
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert (bn.weight == 1).all() and (bn.bias == 0).all()
    fc = net.fc  # torch's default: uniform in +-1/sqrt(fan_in)
    assert float(fc.weight.detach().abs().max()) <= 64 ** -0.5


def test_zero_init_residual_makes_blocks_start_as_identity():
    net = resnet.build("resnet20", zero_init_residual=True)
    assert all((b.bn2.weight == 0).all() for b in net.stages.modules() if hasattr(b, "bn2"))
    plain = resnet.build("plain20", zero_init_residual=True)  # ignored by plain twins
    assert all((b.bn2.weight == 1).all() for b in plain.stages.modules() if hasattr(b, "bn2"))
    for name in ("resnet18", "resnet50", "preresnet20"):  # every family passes the option on
        net = resnet.build(name, width=0.125 if name != "preresnet20" else 1.0, zero_init_residual=True)
        blocks = [b for b in net.modules() if hasattr(b, "last_bn")]
        assert blocks and all((b.last_bn().weight == 0).all() for b in blocks), name


def test_in_channels_for_grayscale():
    assert resnet.build("resnet8", in_channels=1)(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_parse_and_available():
    assert resnet.parse("resnet50").family == "imagenet"
    assert resnet.parse("cifar_resnet50") == resnet.ModelName("cifar_resnet50", "cifar", "resnet", 50)
    assert resnet.parse("preplain110").residual is False
    names = resnet.available()
    assert {"resnet20", "plain56", "preresnet110", "resnet18", "plain152", "cifar_plain50"} <= set(names)
    assert {"cifar_resnet50", "cifar_resnet152", "cifar_plain152"} <= set(names)
    for name in names:
        assert resnet.parse(name).name == name == name.lower()  # canonical names, as the CLI prints them


@pytest.mark.parametrize("name", ["resnet21", "plain7", "preresnet18", "plain2", "resnet0"])
def test_invalid_depth_says_6n_plus_2(name):
    with pytest.raises(ValueError, match=r"6n\+2.*20, 32, 44"):
        resnet.build(name)


@pytest.mark.parametrize("name", ["vgg16", "resnet", "plainnet", "", "resnet-20"])
def test_unknown_family_lists_families(name):
    with pytest.raises(ValueError, match="known families: resnet"):
        resnet.build(name)


FAMILIES = ("known families: resnet{d}/plain{d} and preresnet{d}/preplain{d} with CIFAR depth d = 6n+2 (e.g. 8, 14, "
            "20, 32, 44, 56, 110, 1202); resnet/plain{18,34,50,101,152} (ImageNet-style); cifar_resnet{d}/cifar_plain{d} "
            "for the CIFAR family at 50 or 152; methods and plugins at d = 6n+2: highway{d}, fixup{d}, skipinit{d}, "
            "rezero{d}, dirac{d}, tat{d}")


@pytest.mark.parametrize("name,opts,message", [
    ("vgg16", {}, f"unknown network 'vgg16': {FAMILIES}"),
    ("resnet21", {}, "invalid depth in 'resnet21': CIFAR depths are 6n+2 with n >= 1 (e.g. 8, 14, 20, 32, 44, 56, 110, "
                     "1202); the ImageNet-style family (resnet/plain only) has 18, 34, 50, 101, 152"),
    ("resnet20", {"num_classes": 0}, "num_classes must be a positive integer, got 0"),
    ("resnet20", {"num_classes": 2.0}, "num_classes must be a positive integer, got 2.0"),
    ("resnet20", {"width": 0}, "width must be positive (e.g. 0.5 or 1), got 0"),
    ("resnet20", {"width": -1.0}, "width must be positive (e.g. 0.5 or 1), got -1.0"),
    ("resnet20", {"in_channels": 0}, "in_channels must be a positive integer, got 0"),
    ("resnet20", {"in_channels": 1.0}, "in_channels must be a positive integer, got 1.0"),
    ("resnet20", {"shortcut": "d"}, "shortcut must be one of A, B, C for resnet nets, got 'D'"),
    ("resnet18", {"stem": "huge"}, "stem must be one of cifar, imagenet, got 'huge'"),
    ("resnet20", {"stem": "imagenet"}, "'resnet20' is a CIFAR-family net: its stem is fixed (the stem option is for "
                                       "resnet18..152)"),
    ("cifar_fixup20", {}, "unknown network 'cifar_fixup20': the cifar_ prefix names resnet{d}/plain{d} at 50 or 152"),
    ("fixup20", {"shortcut": "B"}, "shortcut must be one of A for fixup nets, got 'B'"),
    ("rezero20", {"zero_init_residual": True}, "zero_init_residual is for resnet/preresnet nets; rezero has its own "
                                               "initialisation"),
    ("dirac20", {"stem": "imagenet"}, "'dirac20' is a CIFAR-family net: its stem is fixed (the stem option is for "
                                       "resnet18..152)"),
    ("tat20", {"width": 0}, "width must be positive (e.g. 0.5 or 1), got 0"),
])
def test_each_refusal_says_what_is_wrong_word_for_word(name, opts, message):
    with pytest.raises(ValueError) as e:
        resnet.build(name, **opts)
    assert str(e.value) == message


def test_names_parse_case_and_space_insensitively_and_the_boundaries_hold():
    assert resnet.parse(" ResNet20 ") == resnet.ModelName(" ResNet20 ", "cifar", "resnet", 20)
    assert resnet.parse("preresnet8").depth == 8 and resnet.parse("plain18").family == "imagenet"
    for name in ("preresnet18", "cifar_resnet18", "resnet2"):  # only resnet/plain have ImageNet depths; n >= 1
        with pytest.raises(ValueError, match="invalid depth"):
            resnet.parse(name)
    for n in (1, 3):  # the smallest counts pass
        net = resnet.build("plain8", num_classes=n, in_channels=n, width=0.125)
        assert net(torch.zeros(1, n, 32, 32)).shape == (1, n)


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_stem_nets_are_torchvisions(depth):
    """With the 7x7/2 stem and 1000 classes, ResNet-18/50 have torchvision's parameters and
    multiply-adds at 224x224 (stem kernel, stride and padding, max-pool, stage strides)."""
    import torchvision

    ours = resnet.build(f"resnet{depth}", 1000, stem="imagenet")
    ref = getattr(torchvision.models, f"resnet{depth}")()
    assert resnet.count_params(ours) == resnet.count_params(ref)
    assert resnet.count_macs(ours, (3, 224, 224)) == resnet.count_macs(ref, (3, 224, 224))


@pytest.mark.parametrize("shortcut", ["A", "B", "C"])
@pytest.mark.parametrize("grow", [False, True])  # same shape, or stride 2 and more channels
@pytest.mark.parametrize("kind", ["basic", "bottleneck", "preact"])
def test_a_residual_block_whose_branch_is_silenced_passes_its_shortcut(kind, grow, shortcut):
    """The addition itself: branch output zero -> the block returns the shortcut (through the final
    ReLU of post-activation blocks). A subtraction or a missing addition fails here."""
    from resnet.blocks import BasicBlock, Bottleneck, PadShortcut, PreActBlock

    cls = {"basic": BasicBlock, "bottleneck": Bottleneck, "preact": PreActBlock}[kind]
    planes = 8 if grow else (4 if kind == "bottleneck" else 16)
    block = cls(16, planes, 2 if grow else 1, residual=True, shortcut=shortcut).eval()
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        if kind == "preact":
            block.conv2.weight.zero_()
        else:
            block.last_bn().weight.zero_()
            block.last_bn().bias.zero_()
        if block.shortcut is None:
            sc = x
        elif kind == "preact" and not isinstance(block.shortcut, PadShortcut):
            sc = block.shortcut(torch.relu(block.bn1(x)))  # a projection sees the pre-activated input
        else:
            sc = block.shortcut(x)
        expect = sc if kind == "preact" else torch.relu(sc)
        torch.testing.assert_close(block(x), expect)
        assert expect.abs().sum() > 0


def test_block_defaults_are_the_papers():
    """Stride 1 and residual; option A for the CIFAR blocks, B for the bottleneck (as torchvision)."""
    from torch import nn

    from resnet.blocks import BasicBlock, Bottleneck, PadShortcut, PreActBlock

    for cls, cin, planes, shortcut in [(BasicBlock, 16, 32, PadShortcut), (PreActBlock, 16, 32, PadShortcut),
                                       (Bottleneck, 32, 16, nn.Sequential)]:
        block = cls(cin, planes)
        assert block.residual and isinstance(block.shortcut, shortcut), cls
        assert block(torch.randn(2, cin, 8, 8)).shape == (2, planes * cls.expansion, 8, 8)


@pytest.mark.parametrize("name,shortcut", [("resnet20", "A"), ("resnet20", "B"), ("resnet20", "C"), ("plain20", "A")])
def test_response_layers_are_the_bn_after_each_3x3_conv(name, shortcut):
    """He et al. Fig. 7 draws one response per 3x3 conv layer: projection shortcuts' BNs are not layers."""
    net = resnet.build(name, shortcut=shortcut)
    layers = resnet.stats.response_layers(net)
    assert len(layers) == 19 and not any("shortcut" in n for n, _ in layers)
    assert [n for n, _ in layers][:3] == ["stem.1", "stages.0.0.bn1", "stages.0.0.bn2"]


def test_cifar_resnet_defaults_build_the_papers_resnet20():
    """Called directly with its defaults, the CIFAR builder gives what build("resnet20") gives."""
    from resnet.cifar import cifar_resnet

    torch.manual_seed(0)
    direct = cifar_resnet(20)
    torch.manual_seed(0)
    built = resnet.build("resnet20")
    assert str(direct) == str(built)
    a, b = direct.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_preactivation_net_ends_with_bn_and_relu():
    """He et al. 2016 (identity mappings): the last block's sum goes through BN and ReLU before pooling."""
    final = resnet.build("preresnet8").final
    assert [type(m) for m in final] == [torch.nn.BatchNorm2d, torch.nn.ReLU]
