"""A saved profile (`resbench profile`, bench.profile) as tables and figures: what the report draws, what
--against compares and `resbench estimate` reads. Records only (pandas, matplotlib): no torch, no trainer."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import records

MODES = ("train", "infer")
FORMATS = ("nchw", "channels_last")

# what `resbench profile` measures when not told: small on the CPU, the interesting grid on CUDA
DEFAULTS = {
    "cpu": dict(models=("resnet20",), batch_sizes=(32, 128), precisions=("fp32", "bf16"), formats=FORMATS,
                executions=("eager",), group_sizes=(1,), pad_inputs=(0,), workers=2),
    "cuda": dict(models=("resnet20", "plain20", "resnet56", "plain56"), batch_sizes=(128, 512, 2048),
                 precisions=("bf16",), formats=("channels_last",), executions=("eager", "cudagraph"), group_sizes=(1,),
                 pad_inputs=(0,), workers=8),
}


def save(df: pd.DataFrame, out: Path, name: str) -> Path:
    path = Path(out) / "profile" / f"{name}.parquet"
    records.write_table(df, "profile", path)
    return path


def measurements(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (CONFIG_KEYS) and machine: a configuration measured more than once (in one
    call, or in several files of a folder) counts with the median of its img/s. The one rule by which a
    profile's number is quoted (the report, --against, the README)."""
    grid = df[~df["mode"].isin(["train-pipeline", "decode"]) & (df["status"] == "ok")] if "mode" in df else df.iloc[0:0]
    if not len(grid):
        return grid
    grid = grid.assign(**{k: grid[k] if k in grid else d for k, d in (("group_size", 1), ("pad_input", 0),
                                                                       ("image_size", 32))})
    grid = grid.assign(machine=_machine(grid))
    keys = CONFIG_KEYS + ["machine"]
    medians = grid.groupby(keys, as_index=False, dropna=False)["img_per_s"].median()
    rest = grid.drop(columns="img_per_s").drop_duplicates(keys)
    return rest.merge(medians, on=keys)


def profile_table(df: pd.DataFrame) -> pd.DataFrame:
    """Best img/s per model, mode and batch size (with the configuration that gave it), each configuration
    counted by the median of its measurements (``measurements``)."""
    grid = measurements(df)
    best = grid.sort_values("img_per_s", ascending=False).groupby(["model", "mode", "batch_size"], sort=False).head(1)
    out = best.assign(
        config=best["precision"] + " / " + best["memory_format"] + " / " + best["execution"],
        img_per_s=best["img_per_s"].round(0).astype(int),
        mfu=(100 * best["mfu"].astype(float)).round(1),
        memory_MiB=(best["peak_memory_bytes"].astype(float) / 2**20).round(0),
    )
    cols = ["mode", "model", "batch_size", "img_per_s", "config", "mfu", "memory_MiB"]
    return out[cols].rename(columns={"mfu": "MFU %"}).sort_values(["mode", "model", "batch_size"]).reset_index(drop=True)


def pipeline_table(df: pd.DataFrame) -> pd.DataFrame:
    """The common pipeline against ours (rows of `pipeline_comparison`)."""
    pipe = df[df["mode"] == "train-pipeline"] if "mode" in df else df.iloc[0:0]
    cols = ["model", "batch_size", "pipeline", "img_per_s", "speedup", "pipeline_desc", "gpu_name", "utc_time"]
    return pipe.reindex(columns=cols).assign(img_per_s=pipe["img_per_s"].round(0), speedup=pipe["speedup"].round(2))


def profile_figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    grid = df[~df["mode"].isin(["train-pipeline", "decode"]) & (df["status"] == "ok")].copy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, mode in zip(axes, MODES):
        sub = grid[grid["mode"] == mode]
        if len(sub):
            sub = sub.assign(config=sub["precision"] + "/" + sub["memory_format"] + "/" + sub["execution"])
            best = sub.groupby(["model", "batch_size"], as_index=False)["img_per_s"].max()
            sns.lineplot(data=best, x="batch_size", y="img_per_s", hue="model", marker="o", ax=ax)
            ax.set_xscale("log", base=2)
        ax.set_title(f"{mode}: best configuration per batch size")
        ax.set_ylabel("img/s")
    dev = grid["gpu_name"].dropna().unique().tolist() if "gpu_name" in grid else []
    fig.suptitle(f"resbench profile on {', '.join(dev) or 'CPU'}; torch {df['torch_version'].iloc[0]}")
    fig.tight_layout()
    return fig


# -- against a saved profile (`resbench profile --against`) -----------------------------------------

CONFIG_KEYS = ["model", "batch_size", "precision", "memory_format", "execution", "mode", "group_size", "pad_input",
               "image_size"]


DECODE_KEYS = ["mode", "workers", "img_per_s", "img_per_s_per_core", "status"]  # what a decode profile has


def read_reference(path, what: str = "--against", columns=None) -> pd.DataFrame:
    """A saved profile (to compare against, or to estimate from): a parquet file, or a folder holding
    profile/*.parquet. ``what`` names it in errors (the option or argument it came from); ``columns``:
    the ones it must have (a grid profile's by default; DECODE_KEYS for a decode profile)."""
    path = Path(path)
    if path.is_dir():
        files = sorted((path / "profile").glob("*.parquet")) or sorted(path.glob("*.parquet"))
        if not files:
            raise ValueError(f"{path} holds no profile parquet (profile/*.parquet); give a .parquet file or a "
                             f"folder that `resbench profile --out` wrote")
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"{what} {path}: no such file or folder")
    try:
        ref = pd.concat([records.read(f, "profile") for f in files], ignore_index=True)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise ValueError(f"{what} {path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    # bench.schema.upgrade read earlier versions' rows in (single nets, unpadded, 32 x 32): a column with no value
    # at all is one this kind of profile does not have
    missing = [c for c in columns or CONFIG_KEYS + ["img_per_s", "status"] if ref[c].isna().all()]
    if missing:
        command, example = (("resbench profile --decode TREE", "results/reference-decode-cpu") if columns == DECODE_KEYS
                            else ("resbench profile", "results/reference-profile-h200"))
        raise ValueError(f"{what} {path}: not a resbench profile (it lacks the columns {', '.join(missing)}); "
                         f"give a parquet that `{command}` wrote, e.g. {example}")
    return ref


def _machine(df: pd.DataFrame) -> pd.Series:
    gpu = df["gpu_name"] if "gpu_name" in df else pd.Series(None, index=df.index)
    cpu = "CPU " + df["cpu"].astype(str) if "cpu" in df else pd.Series("CPU", index=df.index)
    return gpu.fillna(cpu)


def against(new: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(matched, unmatched): each new measurement beside the reference's median img/s for the same
    configuration (model, batch size, precision, memory format, execution, mode, group size), with
    ratio = this machine / reference; unmatched lists the new configurations the reference lacks."""
    r = measurements(ref).groupby(CONFIG_KEYS, as_index=False).agg(ref_img_per_s=("img_per_s", "median"),
                                                                   ref_machine=("machine", "first"))
    both = measurements(new).merge(r, on=CONFIG_KEYS, how="left")
    both["ratio"] = both["img_per_s"] / both["ref_img_per_s"]
    cols = CONFIG_KEYS + ["machine", "img_per_s", "ref_machine", "ref_img_per_s", "ratio"]
    matched = both[both["ratio"].notna()][cols].reset_index(drop=True)
    return matched, both[both["ratio"].isna()][CONFIG_KEYS].reset_index(drop=True)


def against_figure(matched: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns

    df = matched.assign(config=matched["model"] + " b" + matched["batch_size"].astype(str) + " "
                        + matched["precision"] + "/" + matched["memory_format"] + "/" + matched["execution"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * df["config"].nunique() + 3), 3.8))
    sns.barplot(data=df, x="config", y="ratio", hue="mode", ax=ax)
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_ylabel("img/s here / reference")
    ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=30)
    here, there = df["machine"].iloc[0], df["ref_machine"].iloc[0]
    fig.suptitle(f"{here} against {there} (same configurations; above 1: faster here)")
    fig.tight_layout()
    return fig


def save_against(matched: pd.DataFrame, out: Path, name: str) -> list[Path]:
    """The ratio table and its figure under ``out/profile-against/`` (not profile/, which the report reads)."""
    folder = Path(out) / "profile-against"
    records.write_parquet(matched, folder / f"{name}.parquet")
    paths = [folder / f"{name}.parquet"]
    if len(matched):
        fig = against_figure(matched)
        fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
        paths.append(folder / f"{name}.png")
    return paths
