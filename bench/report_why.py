"""The report's "why do plain nets degrade?" part: gradients recorded in training (layers/, signals/) and
what `resbench diagnose` measured (analysis/lesion.parquet, analysis/shattered.parquet).

Figures say in their titles what they draw; what it may mean goes in the captions (bench.report).
``why_table`` is the summary the README quotes: per net, mean +- sd over seeds (n stated).
Records of earlier versions (other columns) are left out with a note saying how to remake them.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from bench import records

NET = {True: "residual", False: "plain"}
LESION_COLUMNS = {"mode", "position", "k", "draw", "blocks", "error"}
SHATTERED_COLUMNS = {"state", "image", "k", "distance", "correlation"}
LAYER_MEASURES = {"grad_rms", "grad_x_weight"}


def _model(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """``df`` with a "model" label such as plain-20 and the labels in order (plain first, by depth), so
    each net keeps one colour in every panel."""
    df = df.assign(model=df["net"] + "-" + df["depth"].astype(str))
    order = sorted(df["model"].unique(), key=lambda m: (m.split("-")[0], int(m.split("-")[1])))
    return df, order


def _analysis(dirs: list[Path], name: str, runs: pd.DataFrame, needs: set, notes: list) -> pd.DataFrame | None:
    frames = []
    for d in dirs:
        path = d / "analysis" / f"{name}.parquet"
        if not path.exists():
            continue
        df = pd.read_parquet(path)
        if not needs <= set(df.columns):
            notes.append(f"{path} was written by an earlier version of `resbench diagnose` (it lacks "
                         f"{', '.join(sorted(needs - set(df.columns)))}); left out. Rerun `resbench diagnose {d}`")
            continue
        frames.append(df)
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df = df[df["run_id"].isin(runs["run_id"])]
    return df.assign(net=df["residual"].map(lambda r: NET[bool(r)])) if len(df) else None


def _last_point(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Each run's rows at its last evaluation point, with net and depth."""
    last = df.groupby("run_id")["iteration"].transform("max")
    return df[df["iteration"] == last].merge(runs[["run_id", "net", "depth", "seed"]], on="run_id")


def gather(dirs: list[Path], runs: pd.DataFrame, notes: list) -> dict[str, pd.DataFrame]:
    """What the folders hold for this part: lesion, shattered, layers and signals (last evaluation point)."""
    out = {}
    les = _analysis(dirs, "lesion", runs, LESION_COLUMNS, notes)
    if les is not None:
        out["lesion"] = les
    sha = _analysis(dirs, "shattered", runs, SHATTERED_COLUMNS, notes)
    if sha is not None:
        out["shattered"] = sha
    layers = pd.concat([records.load_layers(d) for d in dirs], ignore_index=True)
    if len(layers):
        if LAYER_MEASURES <= set(layers.columns):
            old = layers[list(LAYER_MEASURES)].isna().any(axis=1)
        else:
            old = pd.Series(True, index=layers.index)
        if old.any():
            notes.append(f"{layers.loc[old, 'run_id'].nunique()} run(s) were trained by an earlier version, whose "
                         f"layers/ lack grad_rms and grad_x_weight: left out of the gradient figure")
        layers = _last_point(layers[~old], runs)
        if len(layers):
            out["layers"] = layers
    signals = pd.concat([records.load_signals(d) for d in dirs], ignore_index=True)
    if len(signals):
        signals = _last_point(signals, runs)
        if len(signals):
            out["signals"] = signals
    return out


def gradient_figure(layers: pd.DataFrame | None, signals: pd.DataFrame | None):
    """At each run's last evaluation point: per-parameter gradient RMS and ||g|| ||W|| against the weighted
    layer, and the backward signal's RMS against the block; one colour per net, mean +- sd over seeds."""
    panels = ([("grad_rms", "layer", "weight gradient, RMS per parameter"),
               ("grad_x_weight", "layer", "||weight gradient|| x ||weight||")] if layers is not None else [])
    panels += [("signal_rms", "block", "backward signal at the block's output, RMS")] if signals is not None else []
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels) + 1.5, 3.6), squeeze=False)
    iteration = None
    for ax, (column, x, title) in zip(axes[0], panels):
        df, order = _model(layers if x == "layer" else signals)
        iteration = int(df["iteration"].max())
        sns.lineplot(data=df, x=x, y=column, hue="model", hue_order=order, style="net",
                     style_order=["plain", "residual"], errorbar="sd", ax=ax, legend=ax is axes[0][-1])
        ax.set(yscale="log", title=title, ylabel="")
    sns.move_legend(axes[0][-1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle(f"Gradients at the last evaluation point (iteration {iteration}), by layer and block")
    fig.tight_layout()
    return fig


def lesion_figure(les: pd.DataFrame):
    """Test error with one block deleted (matched positions, and a residual net's downsampling blocks apart),
    and with k random blocks deleted together; mean over each seed's draws, then mean +- sd over seeds."""
    les, order = _model(les.assign(**{"test error (%)": 100 * les["error"]}))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    style = dict(hue="model", hue_order=order, style="net", style_order=["plain", "residual"], errorbar="sd", marker="o")
    single = les[les["mode"] == "single"].assign(block=lambda d: d["blocks"].astype(int))
    sns.lineplot(data=single[single["position"] == "same"], x="block", y="test error (%)", ax=axes[0], legend=False,
                 **style)
    down = single[single["position"] == "downsampling"]
    if len(down):
        sns.scatterplot(data=down, x="block", y="test error (%)", hue="model", hue_order=order, marker="x", s=60,
                        ax=axes[0], legend=False)
    intact = les[les["mode"] == "intact"]
    for model, g in intact.groupby("model"):
        axes[0].axhline(100 * g["error"].mean(), ls=":", lw=1, color=sns.color_palette()[order.index(model) % 10])
    axes[0].set_title("one block deleted (x: downsampling; dotted: intact)")
    per_seed = les[les["mode"].isin(["random", "intact"])].groupby(
        ["model", "net", "seed", "k"], as_index=False)["test error (%)"].mean()
    sns.lineplot(data=per_seed, x="k", y="test error (%)", ax=axes[1], **style)
    axes[1].set_title("k random blocks deleted (matched positions)")
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle("Test error with blocks deleted at test time (lesion study of Veit et al. 2016)")
    fig.tight_layout()
    return fig


def shattered_figure(sha: pd.DataFrame):
    """C(d): cosine of the input gradient at a test image and at distance d along a line through it, at
    initialisation and trained; one colour per net, mean +- sd over seeds (each seed: mean over images)."""
    sha, order = _model(sha)
    per_seed = sha.groupby(["model", "net", "seed", "state", "distance"], as_index=False)["correlation"].mean()
    g = sns.relplot(data=per_seed, kind="line", x="distance", y="correlation", hue="model", hue_order=order,
                    style="net", style_order=["plain", "residual"], col="state",
                    col_order=[c for c in ("init", "trained") if c in set(sha["state"])], errorbar="sd",
                    height=3.4, aspect=1.15)
    g.set_titles("{col_name}")
    g.set_axis_labels("distance along the line (per pixel, normalised units)", "gradient correlation C(d)")
    g.figure.suptitle("Correlation of input gradients against distance from a test image (Balduzzi et al. 2017)",
                      y=1.04)
    return g.figure


def _mean_sd(values: pd.Series, digits: int = 1, scale: float = 1.0) -> str:
    v = values.dropna() * scale
    if not len(v):
        return "-"
    return f"{v.mean():.{digits}f} ± {v.std():.{digits}f}" if len(v) > 1 else f"{v.mean():.{digits}f}"


def why_table(parts: dict[str, pd.DataFrame], runs: pd.DataFrame) -> pd.DataFrame:
    """Per net: mean +- sd over seeds of each measure (each seed's value first averaged over its blocks,
    draws, images or layers), with n; the spread over lesion subsets within a seed, apart."""
    nets = runs[runs["status"] == "ok"][["model", "net", "depth"]].drop_duplicates()
    if not len(nets):
        return pd.DataFrame()
    rows = []
    for _, net in nets.sort_values(["net", "depth"]).iterrows():
        row = {"net": f"{net['net']}-{net['depth']}"}
        les = parts.get("lesion")
        if les is not None:
            mine = les[les["model"] == net["model"]]
            if len(mine):
                row["n"] = mine["seed"].nunique()
                row["test err, intact (%)"] = _mean_sd(mine[mine["mode"] == "intact"].groupby("seed")["error"].mean(), scale=100)
                same = mine[(mine["mode"] == "single") & (mine["position"] == "same")]
                row["one block deleted, same positions (%)"] = _mean_sd(same.groupby("seed")["error"].mean(), scale=100)
                down = mine[(mine["mode"] == "single") & (mine["position"] == "downsampling")]
                row["one downsampling block deleted (%)"] = _mean_sd(down.groupby("seed")["error"].mean(), scale=100)
                rand = mine[mine["mode"] == "random"]
                if len(rand):
                    half = sorted(rand["k"].unique())[len(rand["k"].unique()) // 2]
                    pick = rand[rand["k"] == half]
                    row["k random deleted (%)"] = (f"k={half}: " + _mean_sd(pick.groupby("seed")["error"].mean(), scale=100)
                                                   + f" (sd over sets {100 * pick.groupby('seed')['error'].std().mean():.1f})")
        sha = parts.get("shattered")
        if sha is not None:
            mine = sha[(sha["model"] == net["model"]) & (sha["k"] == sha["k"].max())]
            for state in ("init", "trained"):
                s = mine[mine["state"] == state]
                if len(s):
                    row[f"C(d max), {state}"] = _mean_sd(s.groupby("seed")["correlation"].mean(), digits=3)
        for key, column, label in (("layers", "grad_rms", "weight grad RMS, median over layers"),
                                   ("layers", "grad_x_weight", "||g|| ||W||, median over layers"),
                                   ("signals", "signal_rms", "backward signal RMS, median over blocks")):
            df = parts.get(key)
            if df is not None:
                mine = df[df["run_id"].isin(runs.loc[runs["model"] == net["model"], "run_id"])]
                if len(mine):
                    row[label] = _mean_sd(mine.groupby("seed")[column].median(), digits=3 if key == "signals" else 4)
        rows.append(row)
    return pd.DataFrame(rows).fillna("-")
