"""What a sweep would cost, estimated from a saved profile (`resbench estimate`).

A run of a recipe trains ``iterations x batch_size`` images (an epoch-based recipe's iterations for the
data set's published size, bench.datasets.TRAIN_IMAGES). At the training rate the profile
measured for its net (per GPU, at the batch each GPU gets: the recipe's batch over the run's GPUs),
that takes ``images / (img/s x GPUs)`` hours of wall time and as many GPU-hours times the GPUs. It
is an estimate, and a low one: it counts the training steps only (no evaluation, checkpoints,
start-up, or an input pipeline that cannot keep up) and assumes a data-parallel run scales
linearly over its GPUs. The profile row is the configuration the run would use where the profile
has it (bf16, channels_last, a CUDA graph for a one-GPU run, eager under DDP), else the fastest the
profile has for that net and batch, and the table says which.

Given a decode profile (`resbench profile --decode`, best made on the GPU node itself: the rate per
core is the CPU's), it also says what would feed each GPU of an ImageNet-style run: the CPU cores
the input pipeline needs at the net's rate (decoding in worker processes, at the per-core rate
measured with the most workers), and, where the profile timed decoding on the GPU, the rate training
would reach decoding there: decoding and augmentation then share the GPU's stream with the training step,
so an image costs both times, 1 / (1 / train + 1 / decode), not the smaller of the two rates.
"""
from __future__ import annotations

import pandas as pd

from bench.datasets import SHAPES, TABLE, TRAIN_IMAGES
from bench.specs import PRESETS, RECIPES, model_name

COLUMNS = ["net", "runs", "gpus_per_run", "batch_per_gpu", "execution", "precision", "memory_format", "img_per_s_per_gpu",
           "images_per_run", "hours_per_run", "gpu_hours_per_run", "gpu_hours"]


def images_per_run(r, dataset: str) -> int:
    """The images a run of recipe ``r`` trains on ``dataset`` (an epoch-based schedule at its published size)."""
    train = r.train_size or TRAIN_IMAGES[dataset] - r.val_size
    return r.in_steps(train // r.batch_size).iterations * r.batch_size


def profiled_device(profile: pd.DataFrame) -> str:
    """What the profile timed, in words: 'GPU (NVIDIA H200)', or 'CPU (AMD EPYC, not a GPU)'."""
    gpus = profile["gpu_name"].dropna().unique().tolist() if "gpu_name" in profile else []
    if gpus:
        return f"GPU ({', '.join(map(str, gpus))})"
    cpu = profile["cpu"].dropna().unique().tolist() if "cpu" in profile else []
    return f"CPU ({', '.join(map(str, cpu)) or 'unnamed'}, not a GPU)"


def decode_source(decode: pd.DataFrame, profile: pd.DataFrame) -> list[str]:
    """Where a decode profile's rates came from, in words: the machine and the images it timed, and a warning
    where that machine is not the one the training profile timed (each rate is of its own machine)."""
    rows = decode[decode["mode"] == "decode"]
    cpu = ", ".join(map(str, rows["cpu"].dropna().unique())) or "an unnamed CPU"
    kb, mp = rows["mean_file_kb"].dropna(), rows["mean_megapixels"].dropna()
    images = (f"{int(rows['sampled_images'].dropna().iloc[0]):,} images of {rows['data'].iloc[0]}" if
              rows["sampled_images"].notna().any() else f"images of {rows['data'].iloc[0]}")
    sizes = f", {kb.iloc[0]:.0f} KiB and {mp.iloc[0]:.2f} megapixels on average" if len(kb) and len(mp) else ""
    lines = [f"decode rates: from {images}{sizes}, timed on {cpu} (commit {str(rows['git_sha'].iloc[0])[:7]})"]
    trained = set(profile["gpu_name"].dropna()) or set(profile["cpu"].dropna())
    decoded_on = set(rows["cpu"].dropna())
    if trained and decoded_on and not (decoded_on & set(profile["cpu"].dropna())):
        lines.append(f"note: the decode profile's machine ({cpu}) is not the training profile's "
                     f"({', '.join(map(str, sorted(trained)))}): the cores per GPU assume the training machine's "
                     f"cores decode as fast as those timed")
    if not (rows["decode_on"] == "device").any():
        lines.append("img/s decoding on the GPU: '-': the decode profile has no --decode-on device row (`resbench "
                     "profile --decode TREE --device cuda` times one)")
    return lines


def decode_rates(decode: pd.DataFrame) -> dict:
    """From a decode profile: images per second per CPU core (the setting with the most workers), if timed
    the rate decoding on the device (None if not), and the batch it was timed at."""
    rows = decode[(decode["mode"] == "decode") & (decode["status"] == "ok")]
    if "git_sha" in rows and rows["git_sha"].nunique() > 1:  # e.g. a folder of a before and an after
        raise ValueError(f"the decode profile holds measurements of {rows['git_sha'].nunique()} commits "
                         f"({', '.join(sorted(rows['git_sha'].dropna().str[:7].unique()))}); give one parquet file")
    on = rows["decode_on"] if "decode_on" in rows else pd.Series("workers", index=rows.index)  # older profiles
    cpu, gpu = rows[on == "workers"], rows[on == "device"]
    if cpu.empty:
        raise ValueError("the decode profile has no rows of decoding by CPU workers (resbench profile --decode TREE)")
    most = cpu[cpu["workers"] == cpu["workers"].max()]
    return dict(per_core=float(most["img_per_s_per_core"].median()),
                on_device=float(gpu["img_per_s"].median()) if len(gpu) else None,
                batch_size=int(rows["batch_size"].iloc[0]) if "batch_size" in rows else None)


def estimate(profile: pd.DataFrame, preset: str, *, models=None, depths=None, seeds=None, gpus_per_run: int = 1,
             decode: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per net of ``preset``'s grid (``models`` kinds x ``depths``, ``seeds`` runs each): the profile
    row used and the hours; nets the profile lacks get NaN hours and ``execution`` "not profiled". With
    ``decode`` (a decode profile), also the CPU cores per GPU and the rate training decoding on the GPU gives."""
    p, r = PRESETS[preset], RECIPES[PRESETS[preset]["recipe"]]
    if p["width"] != 1.0:
        raise ValueError(f"the {preset} preset trains width-{p['width']:g} nets; a profile times width-1 nets, so it "
                         f"cannot estimate them (use he2015, he2015-imagenet or imagenette)")
    if r.batch_size % gpus_per_run:
        raise ValueError(f"the batch of {r.batch_size} does not split over {gpus_per_run} GPUs")
    dataset = p.get("dataset", "cifar10")
    if decode is not None and not TABLE[dataset].streams:
        raise ValueError(f"the {preset} preset's data sits decoded in memory: it has no input pipeline to feed "
                         f"(--decode is for he2015-imagenet and imagenette)")
    family = TABLE[dataset].family
    nets = [model_name(kind, depth, family) for depth in depths or p["depths"] for kind in models or p["models"]]
    runs = len(seeds or p["seeds"])
    batch = r.batch_size // gpus_per_run
    size = SHAPES[dataset][0][-1]  # the square input the nets see
    train = profile[(profile["mode"] == "train") & (profile["status"] == "ok") & (profile["batch_size"] == batch)
                    & (profile.get("group_size", 1) == 1) & (profile.get("image_size", 32) == size)]
    keys = ["execution", "precision", "memory_format"]
    wanted = dict(execution="eager" if gpus_per_run > 1 else "cudagraph", precision="bf16", memory_format="channels_last")
    rows = []
    for net in nets:
        mine = train[train["model"] == net]
        row = dict(net=net, runs=runs, gpus_per_run=gpus_per_run, batch_per_gpu=batch,
                   images_per_run=images_per_run(r, dataset))
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
    df = pd.DataFrame(rows, columns=COLUMNS)
    if decode is not None:
        rates = decode_rates(decode)
        df["cpu_cores_per_gpu"] = df["img_per_s_per_gpu"] / rates["per_core"]
        # decoding on the GPU shares its stream with training: each image costs both
        df["img_per_s_decoding_on_gpu"] = (float("nan") if rates["on_device"] is None else
                                           1 / (1 / df["img_per_s_per_gpu"] + 1 / rates["on_device"]))
        df.attrs["decode_batch"] = rates["batch_size"]
    return df
