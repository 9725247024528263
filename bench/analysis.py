"""Analyses of trained nets from their saved final weights (no retraining).

``layer_response_std``: He et al. 2015 Fig. 7, the standard deviation of each 3x3 conv layer's
response (after BN, before the addition and the ReLU) on the test set, per layer index.

``lesion_study``: Veit, Wilber and Belongie 2016: test error with one block deleted (each block in
turn), and with k random blocks deleted together (k = 1..n, ``draws`` random sets each).

``shattered``: Balduzzi et al. 2017, "The Shattered Gradients Problem". Our definition: from a
test image x0 walk a straight line x_t = x0 + t * h * u, t = 0..T-1, with u a random direction of
unit norm per pixel (||u|| = sqrt(D)) and step h; at each point take the gradient of the logit of
the class the net predicts at x0 with respect to the input, g_t (a D-vector). The measure is the
mean cosine similarity of neighbouring gradients, mean_t cos(g_t, g_{t+1}): 1 for a linear map
(a constant gradient), about 0 for gradients that are independent noise. Computed in evaluation
mode (BN's running statistics), after training and, from the run's seed, at initialisation.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

import resnet
from bench import data, records
from bench.specs import RunSpec


def _saved_nets(results_dir: Path, runs: pd.DataFrame, data_root, notes: list | None, what: str):
    """(run row, spec, trained net, test images, their labels, pixel mean) of each ok run with readable weights.

    The data set is found through ``data_root``, else the runs' recorded ``data_source``.
    """
    arrays_by_set: dict = {}
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    for _, run in ok.iterrows():
        wpath = records.paths(results_dir, run["run_id"])["weights"]
        if not wpath.exists():
            continue
        try:
            saved = records.load_torch(wpath, map_location="cpu")
        except records.UnreadableFile as e:
            if notes is not None:
                notes.append(f"{what}: {run['run_id']} left out: {e}")
            continue
        spec = RunSpec.from_dict(saved["spec"])
        if spec.dataset not in arrays_by_set:
            source = data_root
            if source is None and isinstance(run.get("data_source"), str) and Path(run["data_source"]).exists():
                source = run["data_source"]
            arrays_by_set[spec.dataset] = data.load(spec.dataset, source)
        arrays = arrays_by_set[spec.dataset]
        r = spec.recipe
        train_x = data.split(arrays, r.val_size, r.train_size)["train"][0]
        n = r.test_size or len(arrays.test_x)
        net = resnet.build(spec.model, saved["num_classes"], width=spec.width, shortcut=spec.shortcut,
                           in_channels=saved["in_channels"])
        net.load_state_dict(saved["model"])
        yield run, spec, net.eval(), arrays.test_x[:n], arrays.test_y[:n], data.pixel_mean(train_x)


def _ids(run, spec) -> dict:
    return dict(run_id=run["run_id"], model=spec.model, kind=spec.arch.kind, depth=spec.arch.depth, seed=spec.seed,
                residual=spec.arch.residual)


def layer_response_std(results_dir: Path, runs: pd.DataFrame, *, data_root=None, max_images: int = 10_000,
                       batch_size: int = 500, notes: list | None = None) -> pd.DataFrame:
    """One row per (run, layer): run_id, model, kind, depth, seed, layer, layer_name, std.

    Uses the test images the run was evaluated on (its recipe's test_size, at most ``max_images``),
    normalised as in training. Runs whose weights are missing are left out; so are runs whose
    weights file cannot be read safely, with a line in ``notes`` saying why.
    """
    rows = []
    for run, spec, net, x, _, mean in _saved_nets(results_dir, runs, data_root, notes, "Figure 7"):
        if spec.arch.preact:
            continue  # pre-activation blocks have no "after BN, before addition" response
        batches = data.eval_batches(x[:max_images], mean, batch_size, torch.device("cpu"))
        for i, (name, std) in enumerate(resnet.layer_responses(net, batches), 1):
            rows.append(dict(run_id=run["run_id"], model=spec.model, kind=spec.arch.kind, depth=spec.arch.depth,
                             seed=spec.seed, layer=i, layer_name=name, std=std))
    return pd.DataFrame(rows, columns=["run_id", "model", "kind", "depth", "seed", "layer", "layer_name", "std"])


@torch.no_grad()
def _error(net, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, batch_size: int = 500) -> float:
    wrong = 0
    for i, xb in enumerate(data.eval_batches(x, mean, batch_size, torch.device("cpu"))):
        wrong += int((net(xb).argmax(1) != y[i * batch_size: i * batch_size + len(xb)]).sum())
    return wrong / len(x)


def lesion_errors(net, x, y, mean, *, draws: int = 3, seed: int = 0) -> list[dict]:
    """Rows: test error with each deletable block deleted alone (``mode="single"``, ``block``), and with
    k random deletable blocks deleted together (``mode="random"``, ``k``, ``draw``); k = 0 is the intact net."""
    net = net.eval()
    deletable = [i for i, b in enumerate(resnet.blocks(net)) if resnet.deletable(b)]
    rows = [dict(mode="random", k=0, draw=0, block=-1, error=_error(net, x, y, mean))]
    for i in deletable:
        rows.append(dict(mode="single", k=1, draw=0, block=i, error=_error(resnet.lesioned(net, [i]), x, y, mean)))
    g = torch.Generator().manual_seed(seed)
    for k in range(1, len(deletable) + 1):
        for d in range(draws):
            pick = [deletable[j] for j in torch.randperm(len(deletable), generator=g)[:k].tolist()]
            rows.append(dict(mode="random", k=k, draw=d, block=-1,
                             error=_error(resnet.lesioned(net, pick), x, y, mean)))
    return rows


def neighbour_correlation(grads: torch.Tensor) -> float:
    """Mean cosine similarity of consecutive rows of ``grads`` (T, D): 1 when constant, ~0 for noise."""
    g = grads.flatten(1).double()
    return float(F.cosine_similarity(g[:-1], g[1:], dim=1).mean())


def line_gradients(net, x0: torch.Tensor, *, steps: int = 64, step: float = 0.01, seed: int = 0) -> torch.Tensor:
    """(steps, D): the input gradient of the logit of the class predicted at ``x0``, along a random line."""
    net = net.eval()
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(x0.shape, generator=g)
    u *= u.numel() ** 0.5 / u.norm()  # unit norm per pixel
    points = x0[None] + step * torch.arange(steps, dtype=x0.dtype)[:, None, None, None] * u[None]
    points.requires_grad_(True)
    with torch.no_grad():
        cls = int(net(x0[None]).argmax(1))
    net(points)[:, cls].sum().backward()  # eval mode: each point's logit depends on that point only
    return points.grad.flatten(1)


def shattered(net, x: torch.Tensor, mean: torch.Tensor, *, images: int = 8, steps: int = 64, step: float = 0.01) -> list[float]:
    """neighbour_correlation of line_gradients from each of the first ``images`` test images."""
    normed = x[:images].float() / 255 - mean
    return [neighbour_correlation(line_gradients(net, img, steps=steps, step=step, seed=i)) for i, img in enumerate(normed)]


def diagnose(results_dir: Path, runs: pd.DataFrame, *, data_root=None, lesion: bool = True, shattered_: bool = True,
             max_images: int = 2_000, draws: int = 3, images: int = 8, progress: bool = True,
             notes: list | None = None) -> dict[str, pd.DataFrame]:
    """Write analysis/lesion.parquet and analysis/shattered.parquet for the folder's ok runs; return them."""
    from tqdm.auto import tqdm

    results_dir = Path(results_dir)
    les, sha = [], []
    n = int((runs["status"] == "ok").sum()) if "status" in runs else len(runs)
    bar = tqdm(total=n, desc="diagnose", unit="run", disable=None if progress else True)
    for run, spec, net, x, y, mean in _saved_nets(results_dir, runs, data_root, notes, "diagnose"):
        if lesion and not spec.arch.preact:
            les += [_ids(run, spec) | r for r in lesion_errors(net, x[:max_images], y[:max_images], mean, draws=draws)]
        if shattered_:
            torch.manual_seed(spec.seed)  # the trainer's initialisation, from the run's seed
            init = resnet.build(spec.model, net.fc.out_features, width=spec.width, shortcut=spec.shortcut,
                                in_channels=x.shape[1])
            for state, model in (("init", init), ("trained", net)):
                for i, c in enumerate(shattered(model, x, mean, images=images)):
                    sha.append(_ids(run, spec) | dict(state=state, image=i, correlation=c))
        bar.update()
    bar.close()
    out = {}
    for name, rows in (("lesion", les), ("shattered", sha)):
        if rows:
            out[name] = pd.DataFrame(rows)
            records.write_parquet(out[name], results_dir / "analysis" / f"{name}.parquet")
    return out
