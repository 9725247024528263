"""Run groups: which runs may train together as one grouped network, and each member's view of it.

A group is K runs whose networks have one shape (CIFAR basic-block nets with shortcut option A,
one depth, width and data set, one recipe); plain and residual twins mix and seeds differ. The
trainer (bench.train) steps them in lockstep as one ``resnet.stack``-ed network, and ``Members``
translates between that network (and its optimizer) and K ordinary runs: each member's weights,
momentum and gradients are slices of the grouped tensors, so checkpoints, weights files and layer
records stay one per run in the format a run trained alone writes. A group of one is the run's
own network, untouched: the same trainer serves both.

    plan(runs, fuse="auto", device="cuda")   # [[RunSpec, ...], ...]: the groups a sweep trains
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

import resnet
from resnet import group as grouped
from bench.specs import RunSpec

# the most runs --fuse auto puts in one group: the paper's grid has 5 seeds x plain/residual per depth
AUTO_GROUP = 10
FUSE_HELP = ("auto: on CUDA, runs of one shape (depth, width, recipe; plain and residual twins, any seeds) "
             f"train as one grouped network, up to {AUTO_GROUP} at a time; on the CPU, each alone. "
             "off: each alone. K: groups of up to K, on any device")


def group_key(spec: RunSpec) -> tuple | None:
    """What members of one group share, or None for a run that trains alone (other families or shortcuts)."""
    a = spec.arch
    if not resnet.groupable(spec.model, spec.shortcut):
        return None
    return (a.family, a.depth, spec.width, spec.shortcut.upper(), spec.dataset, spec.recipe)


def parse_fuse(value: str) -> int | None:
    """``--fuse``: "auto" -> None, "off" -> 1, "K" -> K (>= 1); ValueError otherwise."""
    v = str(value).strip().lower()
    if v == "auto":
        return None
    if v == "off":
        return 1
    if v.isdigit() and int(v) >= 1:
        return int(v)
    raise ValueError(f"--fuse must be auto, off or a group size >= 1, got {value!r}")


def plan(runs: list[RunSpec], fuse: str = "auto", device: str = "cpu") -> list[list[RunSpec]]:
    """The groups to train, in the order of ``runs`` (each group where its first member was).

    auto groups on CUDA only: on the CPU a grouped convolution is no faster than K separate ones.
    """
    size = parse_fuse(fuse)
    if size is None:
        size = AUTO_GROUP if str(device).startswith("cuda") else 1
    groups: list[list[RunSpec]] = []
    open_: dict[tuple, list[RunSpec]] = {}
    for r in runs:
        key = group_key(r)
        g = open_.get(key) if key is not None else None
        if g is None or len(g) >= size:
            g = [r]
            groups.append(g)
            if key is not None:
                open_[key] = g
        else:
            g.append(r)
    return groups


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

    def __init__(self, nets: list[nn.Module]):
        self.k = len(nets)
        self.names = [n for n, _ in nets[0].named_parameters()]  # a lone run's parameter order
        self.layers = [n for n, m in nets[0].named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        self.model = nets[0] if self.k == 1 else resnet.stack(nets)
        if sorted(n for n, _ in self.model.named_parameters()) != sorted(self.names):
            raise ValueError("the grouped network's parameters do not match its members'")

    def split(self, key: str, value: torch.Tensor) -> list[torch.Tensor]:
        """The members' views (not copies) of the model's tensor named ``key``, or of a tensor shaped like it."""
        return [value] if self.k == 1 else grouped.split(key, value, self.k)

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
                merged[index[name]] = {key: grouped.merge(name, [p[key] for p in parts])
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

    @torch.no_grad()
    def layer_rows(self, opt: torch.optim.Optimizer, k: int, run_id: str, iteration: int) -> list[dict]:
        """Member k's weighted layers: weight norm, the norm of the last step's gradient, and the last
        update relative to the weight (SGD's update is lr x the momentum buffer, weight decay included)."""
        lr = float(opt.param_groups[0]["lr"])
        rows = []
        for i, layer in enumerate(self.layers, 1):
            name = f"{layer}.weight"
            p = self.model.get_parameter(name)
            w = self.split(name, p)[k]
            buf = opt.state.get(p, {}).get("momentum_buffer")
            wn = float(w.norm())
            rows.append(dict(run_id=run_id, iteration=iteration, layer=i, layer_name=layer, weight_norm=wn,
                             grad_norm=float(self.split(name, p.grad)[k].norm()) if p.grad is not None else float("nan"),
                             update_ratio=lr * float(self.split(name, buf)[k].norm()) / wn
                             if buf is not None and wn else float("nan")))
        return rows

    def eval_input(self, x: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """Every member sees the same evaluation images (member-major channels: x's channels K times)."""
        if self.k == 1:
            return x
        out = x.repeat(1, self.k, 1, 1)
        return out.contiguous(memory_format=torch.channels_last) if channels_last else out
