"""What the trainer measures of its members at each evaluation point, beside the loss and errors (a group of one
is a run alone): per weighted layer the weight and gradient norms of the last step (``layer_rows``), and per
block the backward signal (``signal_rows``). Each member's own numbers, read from the grouped network
through bench.fuse.Members, in one device-to-host transfer per measure.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.fuse import Members, _wide


def _norms(m: Members, name: str, t: torch.Tensor | None) -> torch.Tensor:
    """Each member's L2 norm of the tensor named ``name`` (or shaped like it), shape (K,); NaN for None."""
    if t is None:
        p = m.model.get_parameter(name)
        return torch.full((m.k,), float("nan"), device=p.device, dtype=p.dtype)
    return torch.linalg.vector_norm(torch.stack(m.split(name, t.detach())).flatten(1), dim=1)

@torch.no_grad()
def layer_rows(m: Members, opt: torch.optim.Optimizer, run_ids: dict[int, str], iteration: int) -> dict[int, list[dict]]:
    """The weighted layers of the members ``run_ids`` names (member -> run_id), from the last step:

    - ``weight_norm`` ||W|| and ``grad_norm`` ||g|| (L2 over the layer's weight; g of the step's
      mean loss): raw, so they grow with the layer's size, and behind BN g scales as 1/||W||;
    - ``grad_rms`` ||g|| / sqrt(numel), per parameter: comparable across layers of other sizes;
    - ``grad_x_weight`` ||g|| ||W||: unchanged when a weight in front of BN is rescaled (BN undoes
      the scale, g follows 1/scale), so comparable across layers and nets whatever their norms;
    - ``update_ratio`` the last update relative to the weight (SGD's update is lr x the momentum
      buffer, weight decay included).

    Computed on the device and read back in one transfer: one host sync per evaluation point,
    whatever the depth or the group size (the lr too stays on the device, where a CUDA optimizer
    keeps it)."""
    lr = opt.param_groups[0]["lr"]
    nan = float("nan")
    values = []
    for layer in m.layers:
        name = f"{layer}.weight"
        p = m.model.get_parameter(name)
        w, g = _norms(m, name, p), _norms(m, name, p.grad)
        update = lr * _norms(m, name, opt.state.get(p, {}).get("momentum_buffer"))
        numel = m.split(name, p)[0].numel()
        values.append(torch.stack([w, g, torch.where(w > 0, update / w, nan), g / numel ** 0.5, g * w]))
    table = torch.stack(values).tolist()  # (layers, 5, K): the one device-to-host transfer
    return {k: [dict(run_id=run_id, iteration=iteration, layer=i, layer_name=layer, weight_norm=w[k],
                     grad_norm=g[k], update_ratio=u[k], grad_rms=rms[k], grad_x_weight=gw[k])
                for i, (layer, (w, g, u, rms, gw)) in enumerate(zip(m.layers, table), 1)]
            for k, run_id in run_ids.items()}


def signal_rows(m: Members, batches, amp: bool, run_ids: dict[int, str], iteration: int) -> dict[int, list[dict]]:
    """The backward signal at each block's output (He et al. 2015 sec. 4.1 speak of backward-propagated
    signals): the RMS over its elements of d(loss of one image)/d(block output), each member's own,
    averaged over ``batches`` ((x, y) as the step takes them). Train mode, as in training; the BN
    statistics the passes update are put back, the weights' gradients are not touched (autograd.grad).
    Costs one forward and backward per batch at each evaluation point, nothing per training step."""
    from bench.steps import autocast

    named = m.blocks()
    if not named or not batches:
        return {k: [] for k in run_ids}
    model = m.model
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    outputs: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for _, m in named]
    device = next(model.parameters()).device
    total = None
    try:
        model.train()
        for x, y in batches:
            outputs.clear()
            with autocast(amp, device):
                logits = _wide(model(x))
                if logits.dim() == 2:  # one net: (B, classes)
                    loss = F.cross_entropy(logits, y, reduction="sum")
                else:  # (B, K, classes): the sum over members of their images' losses
                    loss = F.cross_entropy(logits.transpose(1, 2), y, reduction="sum")
            grads = torch.autograd.grad(loss, outputs)
            rms = torch.stack([_wide(g).reshape(len(g), m.k, -1).pow(2).mean((0, 2)).sqrt() for g in grads])
            total = rms if total is None else total + rms
    finally:
        for h in hooks:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    table = (total / len(batches)).tolist()  # (blocks, K): one transfer
    return {k: [dict(run_id=run_id, iteration=iteration, block=i, block_name=name, signal_rms=row[k],
                     batches=len(batches))
                for i, ((name, _), row) in enumerate(zip(named, table), 1)]
            for k, run_id in run_ids.items()}

