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
import pyarrow.parquet as pq
import seaborn as sns

from bench import records

def net_labels(df: pd.DataFrame) -> pd.Series:
    """What the figures call a run's net: its row's ``net_label`` (plain or residual for He et al.'s kinds,
    pre-activation ones included; a method's kind for the methods and plugins), as its family said when the run
    was recorded: a report of old records does not change with the plugins installed today."""
    return df["net_label"]


def depth_palette(depths) -> dict:
    """A colour per depth, shallow to deep: viridis without its pale yellow end, which is faint on white."""
    depths = sorted(set(depths))
    return dict(zip(depths, sns.color_palette("viridis", len(depths) + 1)[:len(depths)]))


def net_order(labels) -> list[str]:
    """plain, residual, then the methods alphabetically (one colour and facet place each)."""
    present = set(labels)
    return [k for k in ("plain", "residual") if k in present] + sorted(present - {"plain", "residual"})


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
        written = set(pq.read_schema(path).names)  # what the file holds, before it is read into the schema
        if not needs <= written:
            notes.append(f"{path} was written by an earlier version of `resbench diagnose` (it lacks "
                         f"{', '.join(sorted(needs - written))}); left out. Rerun `resbench diagnose {d}`")
            continue
        df = records.read(path, name)
        frames.append(df)
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df = df.merge(runs[["run_id", "net_label"]], on="run_id")  # the net's label, as its run's row says
    return df.assign(net=df["net_label"]) if len(df) else None


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
    """At each run's last evaluation point, one row of panels per measure (per-parameter weight-gradient RMS
    and ||g|| ||W|| against the weighted layer, the backward signal's RMS against the block) and one
    column per net; colour: depth; mean +- sd over seeds."""
    parts = []
    if layers is not None:
        for column, label in (("grad_rms", "weight gradient RMS"), ("grad_x_weight", "||g|| x ||W||")):
            parts.append(layers.assign(measure=label, position=layers["layer"], value=layers[column]))
    if signals is not None:
        parts.append(signals.assign(measure="backward signal RMS", position=signals["block"],
                                    value=signals["signal_rms"]))
    df = pd.concat(parts, ignore_index=True)
    g = sns.relplot(data=df, kind="line", x="position", y="value", hue="depth", palette=depth_palette(df["depth"]), row="measure",
                    col="net", col_order=net_order(df["net"]), errorbar="sd", height=2.6, aspect=1.3,
                    facet_kws=dict(sharey="row", sharex=False))
    g.set(yscale="log")
    g.set_titles("{row_name}: {col_name}")
    g.set_axis_labels("layer (weights) or block (signal)", "")
    g.figure.suptitle(f"Gradients at the last evaluation point (iteration {int(df['iteration'].max())})", y=1.02)
    return g.figure


def lesion_figure(les: pd.DataFrame):
    """Top: test error with one block deleted, against the block (x: a residual net's downsampling blocks;
    dotted: intact). Bottom: with k random blocks deleted together (matched positions). One column per
    net, colour: depth; each seed's draws averaged, then mean +- sd over seeds."""
    les = les.assign(**{"test error (%)": 100 * les["error"]})
    nets = net_order(les["net"])
    depths = sorted(les["depth"].unique())
    colours = depth_palette(depths)
    fig, axes = plt.subplots(2, len(nets), figsize=(3.4 * len(nets) + 1.2, 6.2), squeeze=False, sharey="row")
    for col, net in enumerate(nets):
        mine = les[les["net"] == net]
        top, bottom = axes[0][col], axes[1][col]
        single = mine[mine["mode"] == "single"].assign(block=lambda d: d["blocks"].astype(int))
        for depth, g in single.groupby("depth"):
            same = g[g["position"] == "same"]
            sns.lineplot(data=same, x="block", y="test error (%)", color=colours[depth], errorbar="sd", marker="o",
                         ax=top)
            down = g[g["position"] == "downsampling"]
            if len(down):
                top.scatter(down["block"], down["test error (%)"], marker="x", color=colours[depth])
            intact = mine[(mine["mode"] == "intact") & (mine["depth"] == depth)]
            top.axhline(intact["test error (%)"].mean(), ls=":", lw=1, color=colours[depth])
        per_seed = mine[mine["mode"].isin(["random", "intact"])].groupby(
            ["depth", "seed", "k"], as_index=False)["test error (%)"].mean()
        sns.lineplot(data=per_seed, x="k", y="test error (%)", hue="depth", palette=colours, errorbar="sd",
                     marker="o", ax=bottom, legend=False)
        top.set_title(f"{net}: one block deleted")
        bottom.set_title(f"{net}: k random blocks deleted")
    from matplotlib.lines import Line2D

    axes[0][-1].legend([Line2D([], [], color=colours[d], marker="o") for d in depths], [str(d) for d in depths],
                       title="depth", loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    fig.suptitle("Test error with blocks deleted at test time (lesion study of Veit et al. 2016)")
    fig.tight_layout()
    return fig


def shattered_figure(sha: pd.DataFrame):
    """C(d): cosine of the input gradient at a test image and at distance d along a line through it; rows:
    at initialisation and trained; one column per net; colour: depth; mean +- sd over seeds (each seed:
    mean over images)."""
    per_seed = sha.groupby(["net", "depth", "seed", "state", "distance"], as_index=False)["correlation"].mean()
    g = sns.relplot(data=per_seed, kind="line", x="distance", y="correlation", hue="depth", palette=depth_palette(per_seed["depth"]),
                    col="net", col_order=net_order(per_seed["net"]), row="state",
                    row_order=[c for c in ("init", "trained") if c in set(sha["state"])], errorbar="sd",
                    height=2.8, aspect=1.2)
    g.set_titles("{row_name}: {col_name}")
    g.set_axis_labels("distance d (per pixel)", "gradient correlation C(d)")
    g.figure.suptitle("Correlation of input gradients against distance from a test image (Balduzzi et al. 2017)",
                      y=1.03)
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
    order = {n: i for i, n in enumerate(net_order(nets["net"]))}
    for _, net in nets.assign(_o=nets["net"].map(order)).sort_values(["_o", "depth"]).iterrows():
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
                    sets = pick.groupby("seed")["error"].std().mean()  # NaN where a k has one set only
                    row["k random deleted (%)"] = (f"k={half}: " + _mean_sd(pick.groupby("seed")["error"].mean(), scale=100)
                                                   + ("" if pd.isna(sets) else f" (sd over sets {100 * sets:.1f})"))
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
