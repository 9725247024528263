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
