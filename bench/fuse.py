"""Run groups: which runs may train together as one grouped network, and each member's view of it.

A group is K runs whose networks have one shape (CIFAR basic-block nets with shortcut option A,
one depth, width and data set, one recipe); plain and residual twins mix and seeds differ. The
trainer (bench.train) steps them in lockstep as one ``resnet.stack``-ed network, and ``Members``
translates between that network (and its optimizer) and K ordinary runs: each member's weights,
momentum and gradients are slices of the grouped tensors, so checkpoints, weights files and layer
records stay one per run in the format a run trained alone writes. A group of one is the run's
own network, untouched: the same trainer serves both.

    plan(runs, Fuse(), device="cuda")   # [[RunSpec, ...], ...]: the groups a sweep trains

A group must fit the device: ``member_bytes`` estimates what one member needs to train, ``fit``
cuts a group into the largest pieces the free memory holds (the planner does it where it knows the
device; the trainer again where it trains, and halves a group that still runs out of memory).
"""
from __future__ import annotations

import functools
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

import resnet
from resnet import group as grouped
from bench.specs import AUTO_GROUP, Execution, Fuse, RunSpec



def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 at least (bf16 under autocast; float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def group_key(spec: RunSpec) -> tuple | None:
    """What members of one group share, or None for a run that trains alone (other families or shortcuts)."""
    a, r = spec.arch, spec.recipe
    if not resnet.groupable(spec.model, spec.shortcut):
        return None
    # mixup's soft targets, PLN's extra input channel and undecayed 1-D parameters' own SGD groups are
    # single-net paths (bench.steps, bench.data): such runs train alone
    if r.mixup or r.normalize == "pln" or not r.decay_1d:
        return None
    return (a.family, a.depth, spec.width, spec.shortcut.upper(), spec.dataset, spec.recipe)


def plan(runs: list[RunSpec], fuse: Fuse = Fuse(), device: str = "cpu", *, ex: Execution | None = None,
         memory: int | None = None) -> list[list[RunSpec]]:
    """The groups to train, in the order of ``runs`` (each group where its first member was).

    auto groups on CUDA only: on the CPU a grouped convolution is no faster than K separate ones.
    With ``memory`` (bytes free for one trainer) and ``ex``, no group is larger than ``fit`` allows.
    """
    size = fuse.size
    if size is None:
        size = AUTO_GROUP if str(device).startswith("cuda") else 1
    groups: list[list[RunSpec]] = []
    open_: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        key = group_key(r)
        g = open_.get(key) if key is not None else None
        limit = size if memory is None or ex is None or key is None or size == 1 else min(size, max_members(r, ex, memory))
        if g is None or len(g) >= limit:
            g = [r]
            groups.append(g)
            if key is not None:
                open_[key] = g
        else:
            g.append(r)
    return groups


# -- memory --------------------------------------------------------------------------------------------
# What one member of a group needs to train, from the tensors autograd saves for the backward pass,
# counted once on the CPU (a forward at batch 2 and 4 under the run's autocast; the difference is one
# image's worth). Measured on the CPU (2 cores, torch 2.14.1, glibc told to return freed memory so the
# resident set follows the live tensors): a training step's peak above its start was 1.00 to 1.08
# times that count for ResNet-8/20/56 and plain-20 at batch 128 to 512, fp32 and bf16
# (tests/bench/test_fuse.py checks it). ACTIVATION_OVERHEAD adds room for what a GPU adds and the CPU
# does not show (the caching allocator's rounding and fragmentation, cuDNN workspaces): a margin, not
# a GPU measurement. RESERVE_BYTES stays free for the CUDA context's allocations, the training set
# on the device (150 MB for CIFAR) and the evaluation sets.
ACTIVATION_OVERHEAD = 1.25
EVAL_LIVE = 3  # activations alive at once in an evaluation forward (no graph is kept under no_grad)
PARAM_COPIES = 5  # weights, gradients, momentum, and the copies graph capture takes of weights and momentum
RESERVE_BYTES = 1 << 30


@functools.cache
def _footprint(model: str, width: float, shortcut: str, image_shape: tuple[int, int, int], num_classes: int,
               amp: bool) -> tuple[float, float, int]:
    """(bytes saved for the backward pass per training image, bytes of the largest activation per image,
    parameters) of one net, measured on the CPU."""
    from bench.steps import autocast

    torch.manual_seed(0)
    net = resnet.build(model, num_classes, width=width, shortcut=shortcut, in_channels=image_shape[0])
    cpu = torch.device("cpu")

    def saved(batch: int) -> tuple[int, int]:
        storages: dict[int, int] = {}
        largest = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # shared storage once
            return t

        def widest(_m, _i, out) -> None:
            nonlocal largest
            largest = max(largest, out.numel() * out.element_size())

        hooks = [m.register_forward_hook(widest) for m in net.modules() if not list(m.children())]
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(amp, cpu):
                F.cross_entropy(net(torch.zeros(batch, *image_shape)), torch.zeros(batch, dtype=torch.long))
        finally:
            for h in hooks:
                h.remove()
        return sum(storages.values()), largest

    (two, _), (four, wide4) = saved(2), saved(4)
    return (four - two) / 2, wide4 / 4, resnet.count_params(net)


def member_bytes(spec: RunSpec, ex: Execution) -> int:
    """Estimated device memory one member of ``spec``'s shape needs, in training and evaluation, under ``ex``."""
    from bench.data import SHAPES

    image_shape, classes = SHAPES[spec.dataset]
    per_image, widest, params = _footprint(spec.model, spec.width, spec.shortcut, image_shape, classes, ex.amp)
    train = ACTIVATION_OVERHEAD * per_image * spec.recipe.batch_size
    evaluation = EVAL_LIVE * widest * ex.eval_batch_size
    return int(train + evaluation + PARAM_COPIES * 4 * params)


def max_members(spec: RunSpec, ex: Execution, memory: int) -> int:
    """The largest group of ``spec``'s shape that ``memory`` bytes hold (at least 1: a run that does not fit
    alone is tried anyway, and fails as it would alone)."""
    return max(1, int((memory - RESERVE_BYTES) // member_bytes(spec, ex)))


def fit(specs: list[RunSpec], ex: Execution, memory: int | None) -> list[list[RunSpec]]:
    """``specs`` (one group) in consecutive pieces of at most ``max_members``, as even as possible."""
    if memory is None or len(specs) == 1:
        return [specs]
    size = max_members(specs[0], ex, memory)
    pieces = -(-len(specs) // size)  # ceil
    step = -(-len(specs) // pieces)
    return [specs[i : i + step] for i in range(0, len(specs), step)]


def free_memory(device: str | torch.device) -> int | None:
    """Bytes this process can still allocate on ``device``: CUDA's free memory plus what its caching
    allocator holds unused; on the CPU, Linux's MemAvailable. None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def group_id(specs: list[RunSpec]) -> str:
    """The group's name in the records: a lone run's is its own run_id."""
    if len(specs) == 1:
        return specs[0].run_id
    ids = ",".join(sorted(s.run_id for s in specs))
    return f"group{len(specs)}-{hashlib.sha1(ids.encode()).hexdigest()[:10]}"


class Members:
    """K member networks as one trainable model (``.model``), and each member's view of its state.

    ``nets`` are the members as ``resnet.build`` gives them (weights already initialised or loaded):
    K = 1 trains that net itself, K > 1 a ``resnet.stack`` of copies.
    """

    def __init__(self, nets: list[nn.Module], pad_input: int | None = None):
        self.k = len(nets)
        self.names = [n for n, _ in nets[0].named_parameters()]  # a lone run's parameter order
        self.layers = [n for n, m in nets[0].named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        # a lone run is its own net: nothing to pad there (the padded stem is for grouped convolutions)
        self.model = nets[0] if self.k == 1 else resnet.stack(nets, pad_input=pad_input)
        if sorted(n for n, _ in self.model.named_parameters()) != sorted(self.names):
            raise ValueError("the grouped network's parameters do not match its members'")

    def split(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        """The members' views (not copies) of the model's tensor named ``key``, or of a tensor shaped like it."""
        return [value] if self.k == 1 else self.model.split(key, value)

    def state(self, k: int) -> dict[str, torch.Tensor]:
        """Member k's state dict, as its network alone would have it."""
        return {key: v.detach().clone() for key, v in ((key, self.split(key, t)[k])
                                                         for key, t in self.model.state_dict().items())}

    def _param_index(self) -> dict[str, int]:
        return {n: i for i, (n, _) in enumerate(self.model.named_parameters())}

    def optimizer_state(self, opt: torch.optim.Optimizer, k: int) -> dict:
        """Member k's SGD state dict, in the layout an SGD over its network alone has."""
        full = opt.state_dict()
        if self.k == 1:
            return full
        index = self._param_index()
        state = {}
        for i, name in enumerate(self.names):
            s = full["state"].get(index[name])
            if s is not None:
                state[i] = {key: self.split(name, v)[k].clone() if isinstance(v, torch.Tensor) and v.dim() else v
                            for key, v in s.items()}
        group = dict(full["param_groups"][0], params=list(range(len(self.names))))
        return {"state": state, "param_groups": [group]}

    def load_optimizer_states(self, opt: torch.optim.Optimizer, states: list[dict]) -> None:
        """Load the members' SGD states (from their checkpoints) into the group's optimizer."""
        from bench.steps import load_optimizer_state

        if self.k == 1:
            load_optimizer_state(opt, states[0])
            return
        index = self._param_index()
        merged = {}
        for i, name in enumerate(self.names):
            parts = [s["state"].get(i) for s in states]
            if all(p is not None for p in parts):
                merged[index[name]] = {key: self.model.merge(name, [p[key] for p in parts])
                                       if isinstance(parts[0][key], torch.Tensor) and parts[0][key].dim()
                                       else parts[0][key] for key in parts[0]}
        group = dict(opt.state_dict()["param_groups"][0], lr=states[0]["param_groups"][0]["lr"])
        load_optimizer_state(opt, {"state": merged, "param_groups": [group]})

    @torch.no_grad()
    def clear(self, opt: torch.optim.Optimizer, k: int) -> None:
        """Zero member k's slot (weights, BN statistics, gradients, momentum): a diverged member's NaNs
        go, and with its loss masked (TrainStep.mask) the slot stays zero and finite, at no cost to the others."""
        for key, t in self.model.state_dict().items():
            if t.is_floating_point():
                self.split(key, t)[k].zero_()
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                self.split(name, p.grad)[k].zero_()
            for v in opt.state.get(p, {}).values():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    self.split(name, v)[k].zero_()

    def blocks(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of each residual (or plain) block, in forward order: the same names in a lone
        net and in the grouped one."""
        from resnet.blocks import Block

        kind = grouped.GroupedBasicBlock if self.k > 1 else Block
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, kind)]

    def eval_input(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """Every member sees the same evaluation images (member-major channels: x's channels K times)."""
        if self.k == 1:
            return x
        out = grouped.member_major(x.expand(self.k, *x.shape))
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
