"""The training step, in three executions: eager, torch.compile, and a CUDA graph of the whole step.

Small CIFAR nets at batch 128 are launch-bound on a big GPU: a ResNet-56 step is ~1,000 tiny
kernels. Capturing forward, backward and the (fused) SGD update in one CUDA graph replays them
with a single launch. The graph reads its batch from static tensors and its learning rate from a
device tensor, so the schedule and the data change without re-capture.

Metrics are accumulated on the device (loss sum, wrong count) and read only by ``read()``: the
step itself never synchronises with the host.

The same step trains a run group (bench.fuse): a grouped network's logits are (B, K, classes)
and its labels (B, K); the loss is the sum of the members' mean losses, each multiplied by the
member's entry of ``active`` (1, or 0 once ``mask`` took a diverged member out), and the metrics
are kept per member.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from bench.specs import EXECUTIONS  # noqa: F401 (how a step runs: an Execution field, and its choices)
from resnet import member_losses


def autocast(amp: bool, device: torch.device, cache: bool = True):
    """bf16 autocast (parameters, BN included, stay fp32). The cast cache must be off under graph capture."""
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache) if amp else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    """Wait for the device: the clock is read only after this (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def param_groups(model: torch.nn.Module, lr_scales=(), decay_1d: bool = True) -> list[dict]:
    """The model's parameters as SGD groups: the first at the recipe's lr, then one per (name regex, factor)
    of ``lr_scales`` (a method's parameters that train at another lr, e.g. Fixup's scalars at lr / 10),
    each parameter in the first group whose pattern matches its name. ``lr_scale`` stays in the group.
    Without ``decay_1d``, each group's 1-D parameters (biases, BN's affine, per-channel scales) form a group
    of their own with ``weight_decay`` 0 (DiracNet's v2 code), placed after the decayed groups."""
    import re

    groups = [dict(params=[], lr_scale=1.0)] + [dict(params=[], lr_scale=float(f)) for _, f in lr_scales]
    undecayed = [dict(params=[], lr_scale=g["lr_scale"], weight_decay=0.0) for g in groups]
    for name, p in model.named_parameters():
        hit = next((i for i, (pattern, _) in enumerate(lr_scales, 1) if re.search(pattern, name)), 0)
        (groups if decay_1d or p.dim() != 1 else undecayed)[hit]["params"].append(p)
    return [g for i, g in enumerate(groups) if g["params"] or i == 0] + [g for g in undecayed if g["params"]]


def make_optimizer(model: torch.nn.Module, lr: float, momentum: float, weight_decay: float,
                   device: torch.device, lr_scales=(), decay_1d: bool = True) -> torch.optim.SGD:
    """SGD; fused on CUDA with each group's learning rate in a device tensor (graph-capturable)."""
    groups = param_groups(model, lr_scales, decay_1d)
    if device.type == "cuda":
        for g in groups:
            g["lr"] = torch.tensor(lr * g["lr_scale"], device=device)
        return torch.optim.SGD(groups, lr=torch.tensor(lr, device=device), momentum=momentum,
                               weight_decay=weight_decay, fused=True)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr`` times its ``lr_scale`` (the recipe's schedule moves them all together)."""
    for g in opt.param_groups:
        value = lr * g.get("lr_scale", 1.0)
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value)  # in place: a captured graph keeps reading the same tensor
        else:
            g["lr"] = value


def current_lr(opt: torch.optim.Optimizer) -> float:
    """The learning rate the optimizer will use next for its first group, the recipe's (what the records
    show, not what was asked for)."""
    return float(opt.param_groups[0]["lr"])


# how an optimizer runs its update (not what it computes): the live optimizer's, never a checkpoint's
EXECUTION_FLAGS = ("foreach", "fused", "capturable", "differentiable")


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """``opt.load_state_dict`` that keeps each group's lr in the form this optimizer was built with,
    and its implementation flags (``EXECUTION_FLAGS``).

    A checkpoint written on the CPU holds float learning rates and ``foreach=True``, one written on
    CUDA holds device tensors and ``fused=True``. Loading replaces both with the saved values: a CPU
    checkpoint resumed on CUDA would turn the lr tensor into a float (the captured CUDA graph would
    bake that one value in, and every later milestone would be silently ignored) and select foreach
    SGD, which reads a tensor lr with ``.item()``: graph capture fails ("operation not permitted
    when stream is capturing") and eager steps sync with the host. How the update runs belongs to
    the live optimizer; only the state (momentum) and the hyper-parameters come from the checkpoint.
    """
    kept = [g["lr"] for g in opt.param_groups]
    flags = [{k: g[k] for k in EXECUTION_FLAGS if k in g} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, lr, own in zip(opt.param_groups, kept, flags):
        g.update(own)
        value = float(g["lr"])
        if isinstance(lr, torch.Tensor):
            lr.fill_(value)
            g["lr"] = lr
        else:
            g["lr"] = value


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak-memory window: CUDA's allocator peak, or the process's peak RSS on Linux.

    Without this, a CPU run in an in-process sweep would report the largest peak of all earlier runs.
    Returns False where the peak cannot be reset (then the peak is unknown, not the lifetime one).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux >= 4.0: writing 5 resets VmHWM (the peak resident set) to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(device: torch.device) -> int | None:
    """Bytes: CUDA's allocator peak, or the process's peak RSS (VmHWM) since reset_peak_memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


class TrainStep:
    """``step(x, y)`` does one optimizer step and adds its loss and errors to device counters."""

    def __init__(self, model: torch.nn.Module, opt: torch.optim.SGD, *, execution: str = "eager",
                 amp: bool = False, device: torch.device = torch.device("cpu"), members: int = 1):
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {execution!r}")
        if execution == "cudagraph" and device.type != "cuda":
            raise ValueError("execution 'cudagraph' needs a CUDA device; use eager or compile on the CPU")
        self.model, self.opt, self.execution, self.amp, self.device = model, opt, execution, amp, device
        self.forward = torch.compile(model) if execution == "compile" else model
        self.members = members
        self.active = torch.ones(members, device=device)  # a tensor, not a flag: the graph reads it
        self.loss_sum = torch.zeros(members, device=device)
        self.wrong_sum = torch.zeros(members, device=device)  # float: mixup's errors are fractional; counts stay exact
        self.seen = 0
        self.graph = None

    def _eager(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # gradients are cleared before the backward, not after the update: the last step's gradients
        # then stay readable (bench.train's per-layer gradient norms at evaluation points), in every execution
        self.opt.zero_grad(set_to_none=self.execution != "cudagraph")  # a graph needs grads in place
        with autocast(self.amp, self.device, cache=self.execution != "cudagraph"):
            logits = self.forward(x)
            if logits.dim() == 2:  # one network: (B, classes)
                losses = F.cross_entropy(logits, y)[None]  # y: labels (B,), or mixup's targets (B, classes)
                pred = logits.detach().argmax(1)
                # under mixup an image is lam right if the prediction is its own label, 1 - lam if its partner's
                # (Fixup's cifar_train.py counts the same way): one minus the target's weight on the prediction
                wrong = ((1 - y.gather(1, pred[:, None])).sum() if y.is_floating_point() else (pred != y).sum())[None]
            else:  # a grouped network: (B, K, classes) against (B, K)
                losses = member_losses(logits, y)
                wrong = (logits.detach().argmax(2) != y).sum(0)
            loss = (losses * self.active).sum()
        loss.backward()
        self.opt.step()
        self.loss_sum += losses.detach().float() * len(y)
        self.wrong_sum += wrong.float()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.execution == "cudagraph":
            if self.graph is None:
                self._capture(x, y)
            self.static_x.copy_(x, non_blocking=True)
            self.static_y.copy_(y, non_blocking=True)
            self.graph.replay()
        else:
            self._eager(x, y)
        self.seen += len(y)

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Warm up on a side stream, undo the warm-up's updates, then capture one whole step."""
        saved_model = {k: v.clone() for k, v in self.model.state_dict().items()}
        saved_opt = {p: {k: v.clone() for k, v in s.items()} for p, s in self.opt.state.items()}
        self.static_x = x.clone()
        self.static_y = y.clone()
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)  # grads must live at fixed addresses for the graph
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # cuDNN autotuning and the optimizer's lazy state happen here
                self._eager(self.static_x, self.static_y)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # the warm-up steps trained the net: put weights, BN statistics and momentum back
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(saved_model[k])
            for p, s in self.opt.state.items():
                for k, v in s.items():
                    if isinstance(v, torch.Tensor):
                        # momentum starts at zero: SGD's first step (buf = grad) is then unchanged
                        v.copy_(saved_opt[p][k]) if p in saved_opt else v.zero_()
        self.loss_sum.zero_()
        self.wrong_sum.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._eager(self.static_x, self.static_y)

    def mask(self, k: int) -> None:
        """Take member k out of the loss (a diverged member: the others go on; bench.fuse.Members.clear)."""
        self.active[k] = 0.0

    def read_members(self) -> tuple[list[float], list[float], int]:
        """Each member's (mean loss, error fraction), and the images each saw, since the last read. A host sync.
        In a data-parallel run, over every process's images (summed across the ranks)."""
        from bench import ddp

        n = self.seen
        if ddp.active():
            counts = ddp.all_sum(torch.cat([self.loss_sum, self.wrong_sum,
                                            torch.tensor([float(n)], device=self.device)]))
            k = self.members
            self.loss_sum.copy_(counts[:k])
            self.wrong_sum.copy_(counts[k:2 * k])
            n = int(counts[-1])
        loss, wrong = self.loss_sum.tolist(), self.wrong_sum.tolist()
        self.loss_sum.zero_()
        self.wrong_sum.zero_()
        self.seen = 0
        if not n:
            return [float("nan")] * self.members, [float("nan")] * self.members, 0
        return [v / n for v in loss], [v / n for v in wrong], n

    def read(self) -> tuple[float, float, int]:
        """(mean loss, error fraction, images) since the last read, for a step of one network."""
        if self.members != 1:
            raise ValueError("a group's step has one loss per member: use read_members()")
        loss, err, n = self.read_members()
        return loss[0], err[0], n
