"""What a sweep would cost, estimated from a saved profile (`resbench estimate`).

A run of a recipe trains ``iterations x batch_size`` images. At the training rate the profile
measured for its net (per GPU, at the batch each GPU gets: the recipe's batch over the run's GPUs),
that takes ``images / (img/s x GPUs)`` hours of wall time and as many GPU-hours times the GPUs. It
is an estimate, and a low one: it counts the training steps only (no evaluation, checkpoints,
start-up, or an input pipeline that cannot keep up) and assumes a data-parallel run scales
linearly over its GPUs. The profile row is the configuration the run would use where the profile
has it (bf16, channels_last, a CUDA graph for a one-GPU run, eager under DDP), else the fastest the
profile has for that net and batch, and the table says which.
"""
from __future__ import annotations

import pandas as pd

from bench.specs import PRESETS, RECIPES, model_name

IMAGE_SIZES = {"cifar10": 32, "synthetic": 32, "imagenet": 224, "imagenette": 224}  # what the nets see
COLUMNS = ["net", "runs", "gpus_per_run", "batch_per_gpu", "execution", "precision", "memory_format", "img_per_s_per_gpu",
           "images_per_run", "hours_per_run", "gpu_hours_per_run", "gpu_hours"]


def estimate(profile: pd.DataFrame, preset: str, *, models=None, depths=None, seeds=None,
             gpus_per_run: int = 1) -> pd.DataFrame:
    """One row per net of ``preset``'s grid (``models`` kinds x ``depths``, ``seeds`` runs each): the profile
    row used and the hours; nets the profile lacks get NaN hours and ``execution`` "not profiled"."""
    p, r = PRESETS[preset], RECIPES[PRESETS[preset]["recipe"]]
    if p["width"] != 1.0:
        raise ValueError(f"the {preset} preset trains width-{p['width']:g} nets; a profile times width-1 nets, so it "
                         f"cannot estimate them (use he2015, he2015-imagenet or imagenette)")
    if r.batch_size % gpus_per_run:
        raise ValueError(f"the batch of {r.batch_size} does not split over {gpus_per_run} GPUs")
    nets = [model_name(kind, depth) for depth in depths or p["depths"] for kind in models or p["models"]]
    runs = len(seeds or p["seeds"])
    batch = r.batch_size // gpus_per_run
    size = IMAGE_SIZES[p.get("dataset", "cifar10")]
    train = profile[(profile["mode"] == "train") & (profile["status"] == "ok") & (profile["batch_size"] == batch)
                    & (profile.get("group_size", 1) == 1) & (profile.get("image_size", 32) == size)]
    keys = ["execution", "precision", "memory_format"]
    wanted = dict(execution="eager" if gpus_per_run > 1 else "cudagraph", precision="bf16", memory_format="channels_last")
    rows = []
    for net in nets:
        mine = train[train["model"] == net]
        row = dict(net=net, runs=runs, gpus_per_run=gpus_per_run, batch_per_gpu=batch, images_per_run=r.iterations * r.batch_size)
        if mine.empty:
            rows.append(row | dict(execution="not profiled"))
            continue
        rates = mine.groupby(keys)["img_per_s"].median()  # a configuration timed twice: its median
        match = [k for k in rates.index if dict(zip(keys, k)) == wanted]
        best = match[0] if match else rates.idxmax()
        rate = float(rates[best])
        hours = row["images_per_run"] / (rate * gpus_per_run) / 3600
        rows.append(row | dict(zip(keys, best)) | dict(img_per_s_per_gpu=rate, hours_per_run=hours,
                                                       gpu_hours_per_run=hours * gpus_per_run,
                                                       gpu_hours=hours * gpus_per_run * runs))
    return pd.DataFrame(rows, columns=COLUMNS)
