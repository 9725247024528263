"""Run groups (resnet.stack): K nets as one grouped network must be the same experiment as K nets.

On the CPU, no amp. Grouped convolutions and a batched head sum the same products in another order
than K separate layers, so values agree to float re-association error, not bit for bit. A forward
pass agrees to 1e-5 in fp32. Training amplifies that rounding: after 20 SGD steps at lr 0.1 on
random 16-image batches, fp32 weights of the group and of the separate nets differed by up to 2.7e-2
(measured; 1e-7 after 2 steps), and the same 20 steps in float64 agree to 1e-15. So the 20-step
test runs in float64 with a bound of 1e-9: any real difference (a member seeing another's data or
gradient, a wrong mask, weight decay or momentum) is many orders of magnitude larger.
"""
import pytest
import torch
import torch.nn.functional as F

import resnet

MEMBERS = [("plain8", 0), ("resnet8", 0), ("plain8", 1), ("resnet8", 1)]


def _nets(width=0.5):
    nets = []
    for name, seed in MEMBERS:
        torch.manual_seed(seed)
        nets.append(resnet.build(name, width=width))
    return nets


def _batches(k, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 32, 32, generator=g) for _ in range(k)], [torch.randint(0, 10, (n,), generator=g) for _ in range(k)]


def test_stack_then_unstack_gives_back_each_members_weights_exactly():
    nets = _nets()
    group = resnet.stack(nets)
    back = resnet.unstack(group)
    assert group.k == 4 and group.residual == [False, True, False, True]
    for net, state in zip(nets, back):
        ref = net.state_dict()
        assert list(state) == list(ref)
        for key in ref:
            assert state[key].shape == ref[key].shape and torch.equal(state[key], ref[key]), key
        fresh = resnet.build("resnet8", width=0.5)
        fresh.load_state_dict(state)  # loads into an ordinary net, names and shapes as resnet.build gives


def test_group_forward_is_each_members_forward():
    nets = _nets()
    group = resnet.stack(nets)
    xs, _ = _batches(4)
    for train in (True, False):  # batch statistics, then running averages
        group.train(train)
        for n in nets:
            n.train(train)
        out = group(torch.cat(xs, 1))
        assert out.shape == (16, 4, 10)
        for k, (net, x) in enumerate(zip(nets, xs)):
            torch.testing.assert_close(out[:, k], net(x), rtol=1e-5, atol=1e-5)
    # the residual mask matters: a plain member differs from its residual twin built with the same seed
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_twenty_sgd_steps_in_a_group_match_four_separate_runs():
    nets = [n.double() for n in _nets()]
    group = resnet.stack(nets)
    start = [{k: v.clone() for k, v in n.state_dict().items()} for n in nets]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4) for n in nets]
    gopt = torch.optim.SGD(group.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(20):
        xs, ys = _batches(4, seed=step)
        xs = [x.double() for x in xs]
        for net, opt, x, y in zip(nets, opts, xs, ys):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        gopt.zero_grad()
        resnet.group_loss(group(torch.cat(xs, 1)), torch.stack(ys, 1)).backward()
        gopt.step()
    for net, state, before in zip(nets, resnet.unstack(group), start):
        moved = max((net.state_dict()[k].float() - before[k].float()).abs().max() for k in before)
        assert moved > 1e-2  # training really changed the weights
        for key, value in net.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-9, atol=1e-9, msg=key)


def test_group_loss_is_the_sum_of_member_means():
    logits = torch.randn(5, 3, 10)
    y = torch.randint(0, 10, (5, 3))
    expect = sum(F.cross_entropy(logits[:, k], y[:, k]) for k in range(3))
    torch.testing.assert_close(resnet.group_loss(logits, y), expect)


@pytest.mark.parametrize("nets,message", [
    (lambda: [resnet.build("resnet8"), resnet.build("resnet14")], "one shape"),
    (lambda: [resnet.build("resnet8"), resnet.build("resnet8", width=0.5)], "one shape"),
    (lambda: [resnet.build("resnet8", shortcut="B")], "option A"),
    (lambda: [resnet.build("preresnet8")], "post-activation"),
    (lambda: [resnet.build("resnet50")], "basic-block|option A"),
    (lambda: [], "at least one"),
])
def test_what_a_group_cannot_hold_is_refused(nets, message):
    with pytest.raises(ValueError, match=message):
        resnet.stack(nets())


@pytest.mark.parametrize("names", [["resnet14"], ["plain14", "resnet14", "resnet14"]])
def test_groups_of_one_and_of_deeper_nets_compute_their_members(names):
    """Depth 14 has two blocks per stage (the second keeps stride 1 and its stage's width); a group
    of one is a valid group (the trainer's K = 1 never builds one, a user may)."""
    nets = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        nets.append(resnet.build(name, width=0.5).eval())
    group = resnet.stack(nets).eval()
    xs, _ = _batches(len(nets), n=4)
    out = group(torch.cat(xs, 1))
    for k, (net, x) in enumerate(zip(nets, xs)):
        torch.testing.assert_close(out[:, k], net(x), rtol=1e-5, atol=1e-5)
    assert group.residual == [n.startswith("resnet") for n in names]


def _block_outputs(net, x, amp=True):
    """Under bf16 autocast (``amp``): (name, dtype) of the stem, every block and the head's output, in forward
    order, and the logits. The grouped net and a lone net share these module names."""
    seen = []
    watched = [(n, m) for n, m in net.named_modules() if n in ("stem", "fc") or n.count(".") == 1 and n.startswith("stages")]
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: seen.append((n, out.dtype))) for n, m in watched]
    try:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = net(x)
    finally:
        for h in hooks:
            h.remove()
    return seen, logits


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                  reason="needs CUDA")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("names", [["plain8", "resnet8", "plain8", "resnet8"], ["plain8", "plain8"],
                                   ["resnet8", "resnet8"]], ids=["mixed", "all-plain", "all-residual"])
def test_under_bf16_autocast_a_member_computes_at_the_precision_it_has_alone(names, device):
    """Every block output and the logits have the lone net's dtype: a float32 mask or bias would
    promote a group holding a residual member (or the head) to float32 while the same net alone runs
    bf16, so a run's precision would depend on the group the planner put it in. (The CPU's autocast
    rules for these ops are CUDA's; on a GPU the same test runs under CUDA's.)"""
    nets = []
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        nets.append(resnet.build(name, width=0.5).to(device))
    xs, _ = _batches(len(nets), n=4)
    xs = [x.to(device) for x in xs]
    stacked = resnet.stack(nets)
    blocks = [b for stage in stacked.stages for b in stage]
    assert all(b.mask is None for b in blocks) == all(n.startswith("resnet") for n in names)  # nothing to mask
    group, group_logits = _block_outputs(stacked, torch.cat(xs, 1))
    for net, x in zip(nets, xs):
        alone, logits = _block_outputs(net, x)
        assert group == alone and group_logits.dtype == logits.dtype == torch.bfloat16


def test_a_mixed_groups_bf16_logits_are_the_lone_nets_bf16_logits():
    """A member rounds where it rounds alone (same ops, same dtypes), so group and lone logits differ only
    by the order of additions inside a kernel (0 on the 2-core CI CPU, measured): far less than a lone
    net's own bf16 logits differ from its fp32 ones, the sum of a rounding at every layer. A bound of a
    quarter of that gap holds a group that skips a rounding (a float32 add in a residual member, as with
    a float32 mask: 70 to 90 % of the gap, measured) out."""
    nets = _nets()
    for net in nets:
        net.to(memory_format=torch.channels_last)
    group = resnet.stack(nets)
    xs, _ = _batches(4)
    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = group(torch.cat(xs, 1).contiguous(memory_format=torch.channels_last))
        alone = [net(x) for net, x in zip(nets, xs)]
    for k, (net, x) in enumerate(zip(nets, xs)):
        gap = (net(x) - alone[k].float()).abs().max()  # bf16 against fp32, the same net alone
        assert gap > 0
        assert (out[:, k].float() - alone[k].float()).abs().max() <= gap / 4, k


def _activation_formats(net, x):
    """(module name, channels_last?) of every 4-D activation a forward pass produces."""
    seen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, n=n: seen.append((n, out.is_contiguous(memory_format=torch.channels_last))))
             for n, m in net.named_modules() if n and not isinstance(m, (torch.nn.Sequential, torch.nn.Linear))]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return [s for s in seen if s[0] and not s[0].startswith("fc")]


@pytest.mark.parametrize("pad_input", [None, 4])
def test_every_activation_of_a_channels_last_group_is_channels_last(pad_input):
    """Downsampling blocks included: their zero-padded shortcut (option A) is added to the branch, and an
    NCHW shortcut beside a channels_last branch makes that add, forward and backward, a strided copy."""
    group = resnet.stack(_nets(), pad_input=pad_input).to(memory_format=torch.channels_last)
    xs, _ = _batches(4, n=4)
    seen = _activation_formats(group, torch.cat(xs, 1).contiguous(memory_format=torch.channels_last))
    assert any(n.endswith("shortcut") for n, _ in seen) and (pad_input is None or ("pad", True) in seen)
    assert [n for n, cl in seen if not cl] == []


def test_a_padded_stem_computes_the_same_and_its_extra_weights_stay_zero():
    """pad_input=4: each member's input gets a fourth, zero channel and the stem a zero weight for it.
    The real channels give the same outputs and gradients (float64: exactly up to re-association), the
    extra weights get exactly zero gradient, SGD with weight decay leaves them zero, and unstack drops them."""
    nets = [n.double() for n in _nets()]
    plain, padded = resnet.stack(nets), resnet.stack(nets, pad_input=4)
    stem = padded.stem[0].weight
    assert stem.shape == (4 * 8, 4, 3, 3) and padded.stem[0].groups == 4
    assert torch.equal(stem[:, 3:], torch.zeros_like(stem[:, 3:]))
    xs, ys = _batches(4)
    x, y = torch.cat(xs, 1).double(), torch.stack(ys, 1)
    outs = []
    for g in (plain, padded):
        out = g(x)
        resnet.group_loss(out, y).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert torch.equal(stem.grad[:, 3:], torch.zeros_like(stem.grad[:, 3:]))
    for k, (real, extra) in enumerate(zip(padded.split("stem.0.weight", stem.grad), stem.grad.chunk(4))):
        torch.testing.assert_close(real, plain.split("stem.0.weight", plain.stem[0].weight.grad)[k], rtol=1e-12, atol=1e-12)
        assert real.shape == (8, 3, 3, 3) and real.data_ptr() == extra.data_ptr()  # a view: writes go through
    opt = torch.optim.SGD(padded.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(3):
        opt.zero_grad()
        xs, ys = _batches(4, seed=step)
        resnet.group_loss(padded(torch.cat(xs, 1).double()), torch.stack(ys, 1)).backward()
        opt.step()
    assert torch.equal(stem[:, 3:], torch.zeros_like(stem[:, 3:])) and stem[:, :3].abs().sum() > 0
    for net, state in zip(nets, resnet.unstack(padded)):
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="^pad_input must be at least the input's 3 channels, got 2$"):
        resnet.stack(nets, pad_input=2)
