"""Analyses of trained nets from their saved final weights (no retraining).

``layer_response_std``: He et al. 2015 Fig. 7, the standard deviation of each 3x3 conv layer's
response (after BN, before the addition and the ReLU) on the test set, per layer index.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

import resnet
from bench import data, records
from bench.specs import RunSpec


def layer_response_std(results_dir: Path, runs: pd.DataFrame, *, data_root=None, max_images: int = 10_000,
                       batch_size: int = 500, notes: list | None = None) -> pd.DataFrame:
    """One row per (run, layer): run_id, model, kind, depth, seed, layer, layer_name, std.

    Uses the test images the run was evaluated on (its recipe's test_size, at most ``max_images``),
    normalised as in training. Runs whose weights are missing are left out; so are runs whose
    weights file cannot be read safely, with a line in ``notes`` saying why.
    """
    rows = []
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
                notes.append(f"Figure 7: {run['run_id']} left out: {e}")
            continue
        spec = RunSpec.from_dict(saved["spec"])
        if spec.arch.preact:
            continue  # pre-activation blocks have no "after BN, before addition" response
        if spec.dataset not in arrays_by_set:
            arrays_by_set[spec.dataset] = data.load(spec.dataset, data_root)
        arrays = arrays_by_set[spec.dataset]
        r = spec.recipe
        train_x = data.split(arrays, r.val_size, r.train_size)["train"][0]
        n = min(max_images, r.test_size or len(arrays.test_x))
        net = resnet.build(spec.model, saved["num_classes"], width=spec.width, shortcut=spec.shortcut,
                           in_channels=saved["in_channels"])
        net.load_state_dict(saved["model"])
        batches = data.eval_batches(arrays.test_x[:n], data.pixel_mean(train_x), batch_size, torch.device("cpu"))
        for i, (name, std) in enumerate(resnet.layer_responses(net, batches), 1):
            rows.append(dict(run_id=run["run_id"], model=spec.model, kind=spec.arch.kind, depth=spec.arch.depth,
                             seed=spec.seed, layer=i, layer_name=name, std=std))
    return pd.DataFrame(rows, columns=["run_id", "model", "kind", "depth", "seed", "layer", "layer_name", "std"])
