"""Report: figures and tables from a results folder's parquet records (never imports the trainer).

    from bench.report import build_report
    rep = build_report("results/smoke")   # figures (matplotlib), tables (DataFrames), files written

Figures: Fig. 6-style training curves, the degradation curve (final error against depth),
throughput, Fig. 7 layer responses (what `resbench diagnose` measured on the saved weights) and, when the
folder holds `resbench profile` output, the profile. Tables: final test error against He et al.
Table 6, and the runs that are missing, failed or diverged.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from bench import outcome, published, records, tuning, verdicts  # noqa: E402
from bench.datasets import TABLE  # noqa: E402
from bench import report_why as why  # noqa: E402
from bench.report_why import _model, net_labels, net_order  # noqa: E402


class ReportError(Exception):
    """Nothing to report (an empty folder, or one without results)."""


@dataclass
class Report:
    figures: dict = field(default_factory=dict)  # name -> matplotlib Figure
    tables: dict = field(default_factory=dict)  # name -> DataFrame
    files: list = field(default_factory=list)  # paths written
    notes: list = field(default_factory=list)  # what could not be drawn, and why
    warnings: list = field(default_factory=list)  # said at the top: what makes a comparison unfair
    summary: list = field(default_factory=list)  # "what these runs show": the verdicts, in sentences (bench.verdicts)
    compared: str | None = None  # the column whose values the figures tell apart


def _runs_frame(runs: pd.DataFrame) -> pd.DataFrame:
    runs = runs.copy()
    runs["net"] = net_labels(runs)
    runs["outcome"] = outcome.label(runs)  # trained | did not train | diverged | failed
    return runs


def trained(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs whose numbers the lines and means are made of: finished and learned something (bench.outcome)."""
    return runs[runs["outcome"] == "trained"]


def _seeds_note(df: pd.DataFrame, by: list[str]) -> str:
    """'n = 3 seeds', or the range over the groups ``by`` (and over the compared values, never pooled)."""
    if not len(df):
        return "n = 0 seeds"
    by = by + ([COMPARE] if COMPARE in df and COMPARE not in by else [])
    n = df.groupby(by)["seed"].nunique()
    lo, hi = int(n.min()), int(n.max())
    return f"n = {lo} seed{'s' if lo > 1 else ''}" if lo == hi else f"n = {lo}..{hi} seeds"


def _apart_note(runs: pd.DataFrame) -> str:
    """What the figure leaves out of its lines: '; grey: 2 runs that did not train, 1 diverged' ('' if none)."""
    counts = runs["outcome"].value_counts()
    parts = [f"{int(counts[k])} {'run that ' if counts[k] == 1 else 'runs that '}{k}" if k == "did not train"
             else f"{int(counts[k])} {k}" for k in ("did not train", "diverged") if k in counts]
    return f"; grey, apart from the means: {', '.join(parts)}" if parts else ""


def recipe_note(runs: pd.DataFrame) -> str:
    """The recipe, budget and learning rates the runs show, for a figure's title: 'smoke: 400 steps of batch 64
    on 5000 images; lr 0.05 for every net' (or tuned per net and depth, or per kind)."""
    parts = []
    for (name, steps, batch, size, schedule, milestones, decay, unit), _ in runs.groupby(
            ["recipe", "iterations", "batch_size", "train_size", "schedule", "milestones", "lr_decay", "schedule_in"],
            dropna=False, sort=True):
        images = "all training images" if pd.isna(size) else f"{int(size)} images"
        unit = "epochs" if unit == "epochs" else "steps"
        lr = (", the lr to 0 by a cosine" if schedule == "cosine" else
              f", the lr x{decay:g} at {unit} {milestones.replace(',', ', ')}" if isinstance(milestones, str) and milestones
              else ", a constant lr")
        parts.append(f"{name}: {int(steps)} {unit} of batch {int(batch)} on {images}{lr}")
    if runs["lr_tuning"].isin(["grid", "chosen"]).any():
        lr = "lr tuned per net and depth (the grid's best validation error; see the lr figure)"
    elif runs["lr"].nunique() == 1:
        lr = f"lr {runs['lr'].iloc[0]:g} for every net"
    else:
        per = runs.groupby("net")["lr"].agg(lambda v: "/".join(f"{x:g}" for x in sorted(set(v))))
        lr = "lr " + ", ".join(f"{net} {v}" for net, v in per.items())
    if (runs["method_recipe"] == "paper").any():
        lr += "; methods with their papers' own settings (method_recipe = paper)"
    mixed = _mixup_nets(runs)
    if mixed:
        lr += f"; training error of {', '.join(mixed)} on mixup's mixed batches (not comparable)"
    return "; ".join(parts) + "; " + lr


def _mixup_nets(runs: pd.DataFrame) -> list[str]:
    """The nets whose training error is measured on mixed batches (mixup): not comparable with the others'."""
    return sorted(set(runs.loc[runs["mixup"].fillna(0) > 0, "net"]))


RECIPE_FIELDS = ["recipe", "method_recipe", "schedule", "iterations", "batch_size", "momentum", "weight_decay",
                 "normalize", "mixup", "decay_1d", "warmup_iters", "lr_scales"]


def recipe_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per net, the recipe settings in which the nets differ (and each net's lrs), where any do: what "paper"
    or a per-kind setting means for each kind, read from the rows. Empty where every net shares one recipe."""
    fields = [c for c in RECIPE_FIELDS if c in runs and runs.groupby("net")[c].agg(lambda v: tuple(sorted(set(map(str, v)))))
              .nunique() > 1]
    if not fields:
        return pd.DataFrame()
    rows = []
    for net in net_order(runs["net"]):
        mine = runs[runs["net"] == net]
        row = {"net": net} | {c: "/".join(sorted(set(map(str, mine[c])))) for c in fields}
        row["lr"] = "/".join(f"{v:g}" for v in sorted(set(mine["lr"])))
        rows.append(row)
    return pd.DataFrame(rows)


def _chance_lines(axes, runs: pd.DataFrame) -> None:
    """A dotted line at chance error on each axis (what a net that did not train ends at)."""
    chance = 100 * runs["dataset"].map(outcome.chance_error).max()
    for ax in axes:
        ax.axhline(chance, ls=":", lw=1, color="0.5", zorder=0)


def training_curves(runs: pd.DataFrame, curves: pd.DataFrame, compare: str | None = None,
                    live: pd.DataFrame | None = None):
    """He et al. Fig. 6: error (%) against iterations, train dashed, test solid; one panel per net (plain,
    residual, each method; wrapped four a row), and one row of panels per value of the compared column.
    Lines: mean +- sd over the runs that trained; runs that did not train or diverged are drawn apart, one
    thin grey line each; dotted: chance."""
    keep = ["run_id", "net", "depth", "seed", "model", "outcome"] + ([COMPARE] if compare else [])
    shown = runs[runs["outcome"] != "failed"]
    running = live[keep] if live is not None and len(live) else pd.DataFrame(columns=keep)
    df = curves.merge(pd.concat([shown[keep], running], ignore_index=True), on="run_id")
    # ImageNet-style runs against epochs, as the paper's Figure 4; CIFAR ones against iterations (Figure 6)
    x = "epoch" if all(TABLE[d].streams for d in set(shown["dataset"]) if d in TABLE) and len(shown) else "iteration"
    long = df.melt(id_vars=[x, "net", "depth", "seed", "run_id", "outcome"] + ([COMPARE] if compare else []),
                   value_vars=["train_err", "test_err"], var_name="split", value_name="error (%)")
    long["split"] = long["split"].str.replace("_err", "")
    long["error (%)"] *= 100
    nets = net_order(long["net"])
    layout = dict(row=COMPARE, row_order=sorted(long[COMPARE].unique())) if compare else dict(col_wrap=min(len(nets), 4))
    good = long[long["outcome"] == "trained"]
    lines = dict(kind="line", x=x, y="error (%)", style="split", style_order=["train", "test"],
                 dashes={"train": (4, 2), "test": ""}, col="net", col_order=nets, height=3.6, aspect=1.15,
                 facet_kws=dict(sharex=True, sharey=True), **layout)
    if len(good):
        g = sns.relplot(data=good, hue="depth", errorbar="sd", palette=why.depth_palette(good["depth"]), **lines)
    else:  # no run trained: every run is a grey line of its own, and nothing else is drawn
        g = sns.relplot(data=long, units="run_id", estimator=None, color="0.6", lw=0.8, **lines)
    for (run_id, split), line in long[long["outcome"] != "trained"].groupby(["run_id", "split"]) if len(good) else ():
        key = (line[COMPARE].iloc[0], line["net"].iloc[0]) if compare else line["net"].iloc[0]
        run = line["outcome"].iloc[0] == "running"  # not finished: its points so far, thin black
        line.sort_values(x).plot(x=x, y="error (%)", ax=g.axes_dict[key], color="k" if run else "0.6",
                                 lw=0.7 if run else 0.8, legend=False, ls="--" if split == "train" else "-")
    _chance_lines(g.axes.flat, shown)
    g.set_titles("{row_name}: {col_name}" if compare else "{col_name}")
    g.set_axis_labels(x, "error (%)")
    unfinished = f"; thin black: {len(running)} run(s) not finished, their points so far" if len(running) else ""
    g.figure.suptitle(f"Training curves (dashed: training error, solid: test error; dotted: chance); "
                      f"{_seeds_note(trained(shown), ['model'])}{_apart_note(shown)}{unfinished}\n{recipe_note(shown)}",
                      y=1.01, va="bottom")  # above the facets' titles, however many lines
    return g.figure


def degradation(runs: pd.DataFrame, compare: str | None = None):
    """Final training and test error against depth, each net a line (line style: the value of the compared
    column): mean +- sd over the runs that trained; runs that did not train marked apart (grey x), and chance
    dotted."""
    done = runs[runs["status"] == "ok"]
    long = done.melt(id_vars=["net", "depth", "seed", "outcome"] + ([COMPARE] if compare else []),
                     value_vars=["final_train_err", "final_test_err"], var_name="split", value_name="error (%)")
    long["split"] = long["split"].map({"final_train_err": "final training error", "final_test_err": "final test error"})
    long["error (%)"] *= 100
    good = long[long["outcome"] == "trained"]
    panels = dict(x="depth", y="error (%)", col="split", col_order=["final training error", "final test error"],
                  height=3.6, aspect=1.1, facet_kws=dict(sharey=False))
    if len(good):
        g = sns.relplot(data=good, kind="line", hue="net", marker="o", hue_order=net_order(long["net"]),
                        errorbar="sd", **_style(good, compare), **panels)
    else:  # no run trained: the grey marks are all there is
        g = sns.relplot(data=long, kind="scatter", marker="x", color="0.45", **panels)
    for split, pts in long[long["outcome"] != "trained"].groupby("split") if len(good) else ():
        g.axes_dict[split].scatter(pts["depth"], pts["error (%)"], marker="x", color="0.45", zorder=3,
                                   label="did not train")
    _chance_lines(g.axes.flat, done)
    depths = sorted(done["depth"].unique())
    for ax in g.axes.flat:
        ax.set_xticks(depths)
    g.set_titles("{col_name}")
    g.figure.suptitle(f"Final error against depth; {_seeds_note(trained(done), ['model'])}"
                      f"{_apart_note(runs[runs['status'] != 'failed'])}\n{recipe_note(done)}", y=1.01, va="bottom")
    return g.figure


def _device_title(runs: pd.DataFrame) -> str:
    devs = runs["gpu_name"].dropna().unique().tolist()
    if not devs:
        threads = int(runs["cpu_threads"].iloc[0])
        devs = [f"CPU ({runs['cpu'].iloc[0]}, {threads} thread{'s' if threads != 1 else ''})"]
    batch = ", ".join(map(str, sorted(runs["batch_size"].unique())))
    return f"{' / '.join(devs)}; batch {batch}; torch {runs['torch_version'].iloc[0]}"


def window_ranges(runs: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Per run: the slowest and fastest of its timed windows (the img/s of each stretch between evaluation
    points, less the first, which holds the warm-up: the windows a run's median is taken over)."""
    if not len(curves) or "img_per_s" not in curves:
        return pd.DataFrame(columns=["run_id", "window_min", "window_max"])
    timed = curves.sort_values(["run_id", "iteration"]).groupby("run_id").apply(
        lambda c: c.iloc[1:] if len(c) > 1 else c, include_groups=False).reset_index(level=0)
    return timed.groupby("run_id")["img_per_s"].agg(window_min="min", window_max="max").reset_index()


def throughput(runs: pd.DataFrame, compare: str | None = None, curves: pd.DataFrame | None = None):
    """Training img/s against depth and against multiply-adds (line style: the compared value): each net's mean
    over its runs (their median windows), and a vertical bar from the slowest to the fastest timed window of
    any of its runs, so a run timed on a loaded machine shows."""
    ok = runs[runs["status"] == "ok"].copy()
    ok["MACs (M)"] = ok["macs"] / 1e6
    ranges = window_ranges(ok, curves if curves is not None else pd.DataFrame())
    ok = ok.merge(ranges, on="run_id", how="left")
    order = net_order(ok["net"])
    colours = dict(zip(order, sns.color_palette(n_colors=len(order))))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, x in zip(axes, ["depth", "MACs (M)"]):
        sns.lineplot(data=ok, x=x, y="train_img_per_s", hue="net", hue_order=order, palette=colours, marker="o",
                     errorbar="sd", ax=ax, **_style(ok, compare))
        spans = ok.groupby(["net", x], as_index=False).agg(lo=("window_min", "min"), hi=("window_max", "max")).dropna()
        for r in spans.itertuples():
            ax.vlines(r[2], r.lo, r.hi, color=colours[r.net], lw=1, alpha=0.6)  # r[2]: the x value
        ax.set_ylabel("training img/s")
    axes[0].set_xticks(sorted(ok["depth"].unique()))
    spread = contention(runs, curves if curves is not None else pd.DataFrame())
    busy = (f"\ntimed on a busy machine: one net's windows differ up to {spread:.1f}x (read these as rough)"
            if spread > CONTENDED else "")
    fig.suptitle(f"Training throughput: {_device_title(ok)}; bars: slowest to fastest timed window{busy}")
    fig.tight_layout()
    return fig


CONTENDED = 2.0  # one net's timed windows this many times apart: the machine was busy with something else


def contention(runs: pd.DataFrame, curves: pd.DataFrame) -> float:
    """The largest ratio of fastest to slowest timed window among the runs of one net at one depth (1 where
    nothing was timed twice): above CONTENDED, something else ran on the machine meanwhile."""
    ok = runs[runs["status"] == "ok"]
    ranges = ok.merge(window_ranges(ok, curves), on="run_id", how="left")
    keys = [COMPARE, "net", "depth"] if COMPARE in ranges else ["net", "depth"]  # never across compared settings
    spans = ranges.groupby(keys).agg(lo=("window_min", "min"), hi=("window_max", "max")).dropna()
    spans = spans[spans["lo"] > 0]
    return float((spans["hi"] / spans["lo"]).max()) if len(spans) else 1.0


def response_figure(resp: pd.DataFrame, runs: pd.DataFrame, compare: str | None = None):
    """He et al. Fig. 7: std of layer responses against layer index, plain against residual (line
    style: plain/residual, or the compared value when comparing)."""
    df = resp.merge(runs[["run_id", "net"] + ([COMPARE] if compare else [])], on="run_id")
    df, order = _model(df)
    style = dict(hue="model", hue_order=order, errorbar="sd",
                 **(_style(df, compare) or dict(style="net", style_order=net_order(df["net"]))))
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.6))
    sns.lineplot(data=df, x="layer", y="std", ax=axes[0], legend=False, **style)
    axes[0].set_title("original order")
    srt = df.sort_values("std", ascending=False).copy()
    srt["rank"] = srt.groupby("run_id").cumcount() + 1
    sns.lineplot(data=srt, x="rank", y="std", ax=axes[1], **style)
    axes[1].set_title("sorted by magnitude")
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1), frameon=False)
    for ax in axes:
        ax.set_ylabel("std of response")
    fig.suptitle("Layer responses on the test set (after BN, before addition/ReLU)")
    fig.tight_layout()
    return fig


def comparison_table(runs: pd.DataFrame, compare: str | None = None) -> pd.DataFrame:
    """Final test error (%) per net and depth against He et al. Table 6; mean [95 % t-interval] and sd over seeds.

    When comparing, one error column (and one n column) per value of the compared column.
    """
    if compare:
        return _wide_comparison(runs, compare)
    ok = runs[(runs["status"] == "ok") & (runs["family"] == "cifar") & (runs["kind"].isin(["plain", "resnet"]))]
    rows = []
    for (kind, depth, recipe, width), g in ok.groupby(["kind", "depth", "recipe", "width"], sort=True):
        err = g["final_test_err"] * 100
        mean, sd = err.mean(), (err.std() if len(err) > 1 else float("nan"))
        paper = published.HE2015_RESNET_TEST_ERR.get(depth) if kind == "resnet" else None
        comparable = recipe == "he2015" and width == 1.0 and g["dataset"].iloc[0] == "cifar10"
        rows.append({
            "net": f"{kind}-{depth}", "recipe": recipe, "width": width, "n": len(err),
            "test err % (mean [95 % CI])": verdicts.mean_ci(err, 2), "sd": round(sd, 2),
            "best %": round(err.min(), 2),
            "He et al. %": ("figure only" if kind == "plain" else (f"{paper:.2f}" if paper is not None else "-"))
            + (" (best of 5; mean 6.61 ± 0.16)" if kind == "resnet" and depth == 110 else ""),
            # another recipe, width or data set compares with nothing the paper measured
            "difference": (f"{mean - paper:+.2f}" if paper is not None and comparable else
                           "-" if paper is None else "- (other recipe)"),
        })
    return pd.DataFrame(rows)


def imagenet_table(runs: pd.DataFrame) -> pd.DataFrame:
    """He et al. Table 2: top-1 error (%, 10-crop where the runs took it, else the centre crop) of the
    ImageNet-family runs on ImageNet-style data, mean ± sd over seeds, beside the paper's."""
    ok = runs[(runs["status"] == "ok") & (runs["family"] == "imagenet")]
    rows = []
    for (kind, depth, dataset), g in ok.groupby(["kind", "depth", "dataset"], sort=True):
        ten = "final_test_err_10crop" in g and g["final_test_err_10crop"].notna().all()
        err = 100 * (g["final_test_err_10crop"] if ten else g["final_test_err"])
        paper = published.HE2015_IMAGENET_TOP1_10CROP.get((kind, depth)) if dataset == "imagenet" else None
        rows.append({"net": f"{kind}-{depth}", "data": dataset, "n": len(err), "test": "10-crop" if ten else "centre crop",
                     "top-1 err % (mean [95 % CI])": verdicts.mean_ci(err, 2),
                     "He et al. %": f"{paper:.2f}" if paper is not None else "-",
                     "difference": f"{err.mean() - paper:+.2f}" if paper is not None else "-"})
    return pd.DataFrame(rows)


def final_errors_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final training and test error (%) per net (plain, residual, each method) and depth (outcome.error_cell)."""
    rows = []
    for net in net_order(runs["net"]):
        mine = runs[runs["net"] == net]
        row = {"net": net}
        for depth in sorted(runs["depth"].unique()):
            row[f"depth {depth}: train / test err % (n)"] = outcome.error_cell(mine[mine["depth"] == depth])
        rows.append(row)
    return pd.DataFrame(rows)


def by_compared(table, runs: pd.DataFrame, compare: str | None) -> pd.DataFrame:
    """``table(runs)``, or under --compare-by one such table per compared value, stacked, the value first:
    runs of one net that differ in the compared setting are never pooled."""
    if not compare:
        return table(runs)
    parts = [table(g).pipe(lambda t, v=v: t.insert(0, compare, v) or t)
             for v, g in runs.groupby(COMPARE, sort=True)]
    return pd.concat(parts, ignore_index=True)


def published_methods_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The published numbers (bench.published.METHODS) of the kinds in ``runs``, beside its own at the same depth
    (mean [95 % t-interval] over the runs that trained, and the difference of the mean; every published number
    comes from its paper's recipe, said in the note)."""
    rows = []
    for m in published.METHODS:
        if m["method"] not in set(runs["kind"]):
            continue
        mine = runs[(runs["kind"] == m["method"]) & (runs["depth"] == m["depth"]) & (runs["outcome"] == "trained")]
        err = 100 * mine["final_test_err"]
        rows.append({"net": m["method"], "depth": m["depth"], "published test err %": m["error"],
                     "ours: test err % (n)": f"{verdicts.mean_ci(err, 2)} ({len(err)})" if len(err) else "-",
                     "ours - published": f"{err.mean() - m['error']:+.2f}" if len(err) else "-",
                     "recipes": "ours: " + ", ".join(sorted(set(mine["recipe"]))) + "; theirs: see note" if len(err) else "-",
                     "note": m["note"], "source": m["source"]})
    return pd.DataFrame(rows)


def _wide_comparison(runs: pd.DataFrame, compare: str) -> pd.DataFrame:
    index = ["net", "He et al. %"] + [c for c in ("recipe", "width") if c != compare]
    tables = []
    for value, g in runs.groupby(COMPARE, sort=True):
        t = comparison_table(g.drop(columns=COMPARE))
        if len(t):
            t = t.rename(columns={"test err % (mean [95 % CI])": f"test err % [{value}]", "n": f"n [{value}]"})
            tables.append(t.drop(columns=["best %", "difference", "sd"] + [c for c in ("recipe", "width") if c not in index])
                          .set_index(index))
    if not tables:
        return pd.DataFrame()
    wide = pd.concat(tables, axis=1).reset_index()
    depth = wide["net"].str.split("-").str[1].astype(int)
    return wide.assign(_d=depth).sort_values(["_d", "net"]).drop(columns="_d").astype(object).fillna("-").reset_index(drop=True)


COMPARE = "compared"  # the column holding the compared value as text
# columns measured per run, or naming it: never "a difference between the compared folders"
NOT_SETTINGS = {"run_id", "sweep", "results_dir", "model", "family", "kind", "depth", "residual", "seed", "params",
                "macs", "status", "error", "iterations_done", "resumed_from", "utc_time", "net", COMPARE,
                "cuda_visible_devices", "train_img_per_s", "step_time_ms", "timed_windows", "train_time_s",
                "wall_time_s", "peak_memory_bytes", "late_val_err", "schema_version",
                # what a net is (its family's traits, and whether it can be grouped: follows from model and shortcut)
                "net_label", "baseline", "pre_activation", "has_bn", "groupable"}


def _style(df: pd.DataFrame, compare: str | None) -> dict:
    return dict(style=COMPARE, style_order=sorted(df[COMPARE].unique())) if compare else {}


def differing_columns(runs: pd.DataFrame) -> list[str]:
    """Settings (columns constant within each compared group) whose value differs between groups.

    A group without the column (rows written before it existed) tells nothing, so it is left out.
    """
    groups = runs.groupby(COMPARE)
    out = []
    for col in runs.columns:
        if col in NOT_SETTINGS or col.startswith(("final_", "best_", "test_err_at")):
            continue
        per_group = groups[col].agg(lambda s: tuple(sorted(set(s.dropna().astype(str)))))
        known = per_group[per_group.map(len) > 0]
        if (known.map(len) == 1).all() and known.nunique() > 1:
            out.append(col)
    return out


def expected_runs(results_dir: Path) -> pd.DataFrame | None:
    """The runs the folder's sweep asks for (run_id, model, seed), as the sweep last wrote them to expected.csv
    (bench.sweep.write_expected); None where it has none (a folder of an earlier version, or no sweep)."""
    path = results_dir / "expected.csv"
    return pd.read_csv(path) if path.exists() else None


def status_table(results_dir: Path, runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that are missing (in the sweep spec, no record), failed or diverged."""
    if len(runs):  # a run that did not train is listed too: it finished, but its numbers are not a result
        label = outcome.label(runs)
        bad = runs[label != "trained"].assign(status=label[label != "trained"])[["run_id", "model", "seed", "status",
                                                                                  "error"]]
    else:
        bad = pd.DataFrame()
    expected = expected_runs(results_dir)
    curves = records.table(results_dir / "curves")
    missing = expected[~expected["run_id"].isin(runs["run_id"])] if expected is not None else pd.DataFrame(columns=["run_id"])
    missing = missing.assign(status=["not finished (training, or stopped: `resbench status` says which)"
                                     if rid in set(curves["run_id"]) else "missing" for rid in missing["run_id"]],
                             error="")[["run_id", "model", "seed", "status", "error"]] if len(missing) else pd.DataFrame()
    frames = [f for f in (bad, missing) if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "model", "seed", "status", "error"])


def environment_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The hardware and software the runs came from, one row per distinct combination (a short commit)."""
    cols = ["device", "gpu_name", "cpu", "cpu_threads", "torch_version", "cuda_version", "cudnn_version",
            "python_version", "git_sha", "git_dirty", "amp", "channels_last", "execution", "group_size"]
    table = runs[cols].assign(git_sha=runs["git_sha"].str[:10])
    return table.dropna(axis=1, how="all").astype(str).drop_duplicates().reset_index(drop=True)


def build_report(results_dirs, out=None, fmt: str = "png", *, responses: bool = True,
                 compare_by: str | None = None) -> Report:
    """Draw every figure and table the records allow; write them, report.md and report.html to ``out``.

    ``results_dirs``: one results folder, or several to compare. ``compare_by`` names the run column
    whose values tell the compared groups apart (several folders: default ``sweep``, or the folder
    when all share one sweep name); each figure then draws one facet or line style per value.
    """
    dirs = [Path(d) for d in (results_dirs if isinstance(results_dirs, (list, tuple)) else [results_dirs])]
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"format must be png, svg or pdf, got {fmt!r}")
    if not dirs:
        raise ReportError("give at least one results folder")
    rep = Report()
    runs, curves, profile, live = _load(dirs, rep.notes)
    out = Path(out) if out else dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    compare = None
    if len(runs):
        runs = _runs_frame(runs)
        compare = rep.compared = _compared(runs, dirs, compare_by, rep)
        every = runs
        # a tuned folder's results are its runs at each cell's chosen lr; the rest of its grid is the lr figure's
        runs = tuning.at_chosen(runs)
        if len(runs) < len(every):
            from bench import report_tuning

            rep.figures["lr_grid"] = report_tuning.lr_figure(every)
            rep.tables["tuned"] = report_tuning.tuned_table(every, runs)
        done = runs[runs["status"] != "failed"]
        if len(curves) and len(done):
            rep.figures["training_curves"] = training_curves(runs, curves, compare, None if compare else live)
        if (runs["status"] == "ok").any():
            rep.figures["degradation"] = degradation(runs, compare)
            rep.figures["throughput"] = throughput(runs, compare, curves)
            spread = contention(runs, curves)
            if spread > CONTENDED:
                rep.notes.append(f"throughput: the timed windows of one net differ up to {spread:.1f}x: the machine was "
                                 f"busy with other work while these runs trained, so their img/s are rough")
            _result_tables(runs, rep, compare)
            untrained = runs[runs["outcome"] == "did not train"]
            if len(untrained):
                rep.notes.append(f"{len(untrained)} run(s) did not train (final training error within "
                                 f"{100 * outcome.UNTRAINED_MARGIN:g} points of chance): drawn apart in the curves, "
                                 f"marked in the degradation figure, counted in the tables, and left out of Figure 7, "
                                 f"the gradient, lesion and shattered-gradient figures and the summary of the "
                                 f"measures (the status table lists them)")
            if responses:
                _responses(dirs, trained(runs), rep, compare)
            _diagnostics(dirs, trained(runs), rep)
        rep.tables["status"] = pd.concat([status_table(d, every[every["results_dir"] == str(d)]) for d in dirs],
                                         ignore_index=True)
        rep.tables["environment"] = environment_table(runs)
    elif compare_by:
        raise ReportError(f"--compare-by {compare_by}: these folders hold no runs to compare (only profiles)")
    if profile is not None:
        from bench.profile_tables import pipeline_table, profile_figure, profile_table

        rep.figures["profile"] = profile_figure(profile)
        rep.tables["profile"] = profile_table(profile)
        if (profile["mode"] == "train-pipeline").any():
            rep.tables["pipeline"] = pipeline_table(profile)
    for name, fig in rep.figures.items():
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        if fmt == "png":
            _palette(path)
        plt.close(fig)  # saved: pyplot need not keep it (the Figure itself stays readable in rep.figures)
        rep.files.append(path)
    rep.files += _write_documents(dirs, out, fmt, rep, compare)
    return rep


def _result_tables(runs: pd.DataFrame, rep: Report, compare: str | None) -> None:
    """The tables of results: the papers' numbers where some row compares, the final errors, each net's recipe,
    the verdicts."""
    table6 = comparison_table(trained(runs), compare)
    # a comparison with the paper where some row compares (its recipe, width and data): else no section
    if compare or (len(table6) and table6["difference"].str.match(r"^[+-]\d").any()):
        rep.tables["comparison"] = table6
    if (runs["family"] == "imagenet").any() and any(TABLE[d].streams for d in set(runs["dataset"]) if d in TABLE):
        rep.tables["imagenet"] = imagenet_table(trained(runs))
    rep.tables["final_errors"] = by_compared(final_errors_table, runs, compare)
    rep.tables["recipes"] = recipe_table(runs)
    _verdicts(trained(runs), rep, compare)
    if not compare:
        published_rows = published_methods_table(runs)
        if len(published_rows) and runs["kind"].nunique() > 2:
            rep.tables["published_methods"] = published_rows


def _palette(path: Path) -> None:
    """A PNG figure in 256 colours: a plot's few colours lose nothing visible, and the file shrinks about 3x
    (reports, and the committed references, stay small)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    small.save(path, optimize=True)


def _load(dirs: list[Path], notes: list) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame | None, pd.DataFrame]:
    """(runs, curves, profile, live) of several results folders. Runs get a ``results_dir`` column; a run_id
    found in two folders is taken from the first, and a note says so. ``live``: the runs a folder's sweep asks
    for that have curve points but no record yet (training now, or stopped), one row each (bench.sweep's
    expected.csv), their points among ``curves``."""
    runs_frames, curve_frames, profiles, first, live_frames = [], [], [], {}, []
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"{d} is not a folder; give the folder that `resbench sweep --out` wrote")
        runs, curves = records.load(d)
        profile = _profile_frame(d)
        if not len(runs) and profile is None:
            raise ReportError(f"{d} holds no results (no runs/*.parquet, no profile/*.parquet): not a results "
                              f"folder; run `resbench sweep --out {d}` or `resbench profile --out {d}` first")
        if profile is not None:
            profiles.append(profile)
        if not len(runs):
            continue
        dup = runs["run_id"].isin(first.keys())
        for rid in runs.loc[dup, "run_id"]:
            notes.append(f"{rid} is in {first[rid]} and in {d}: the report uses the copy in {first[rid]}")
        runs = runs[~dup].assign(results_dir=str(d))
        first.update({rid: d for rid in runs["run_id"]})
        runs_frames.append(runs)
        expected = expected_runs(d)
        live = (expected[~expected["run_id"].isin(first.keys()) & expected["run_id"].isin(curves["run_id"])]
                if expected is not None else pd.DataFrame(columns=["run_id"]))
        if len(live):
            live_frames.append(live.assign(net=live["net_label"], outcome="running", status="running", results_dir=str(d)))
        curve_frames.append(curves[curves["run_id"].isin(runs["run_id"]) | curves["run_id"].isin(live["run_id"])])
    cat = lambda frames: pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # noqa: E731
    return cat(runs_frames), cat(curve_frames), (cat(profiles) if profiles else None), cat(live_frames)


def _compared(runs: pd.DataFrame, dirs: list[Path], compare_by: str | None, rep: Report) -> str | None:
    """Add the COMPARE column and return the compared column's name (None: nothing compared)."""
    if compare_by is None and len(dirs) == 1:
        return None
    column = compare_by or "sweep"
    if column not in runs.columns:
        known = ", ".join(sorted(c for c in runs.columns if c not in (COMPARE, "net")))
        raise ReportError(f"--compare-by {column}: no such run column; choose one of: {known}")
    if compare_by is None and runs["sweep"].nunique() == 1:
        column = "results_dir"  # several folders of one sweep name: tell them apart by folder
        rep.notes.append("the folders share one sweep name, so they are compared by folder")
    runs[COMPARE] = runs[column].astype(str)
    if runs[COMPARE].nunique() < 2:
        rep.warnings.append(f"all runs have {column} = {runs[COMPARE].iloc[0]}: nothing to compare")
    others = [c for c in differing_columns(runs) if c != column]
    if others:
        rep.warnings.append(f"these runs differ in more than {column}: also in {', '.join(others)}. "
                            f"Differences in the figures may come from any of these.")
    return column


def _verdicts(runs: pd.DataFrame, rep: Report, compare: str | None) -> None:
    """Every comparison the report draws, with its interval and verdict (bench.verdicts)."""
    found = verdicts.comparisons(runs, compare, COMPARE)
    rep.tables["verdicts"] = verdicts.table(found)
    rep.tables["verdict_rows"] = found  # tidy, written as verdicts.csv beside the report
    rep.summary = verdicts.summary(found)
    mixed = _mixup_nets(runs)
    if mixed:
        rep.notes.append(f"{', '.join(mixed)}: training error measured on mixup's mixed batches (an image counts "
                         f"lam right for its own label, 1 - lam for its partner's), so it is not compared with the "
                         f"others' training error; compare test errors there")


def _diagnostics(dirs: list[Path], runs: pd.DataFrame, rep: Report) -> None:
    """Gradients recorded in training and what `resbench diagnose` measured (bench.report_why)."""
    parts = why.gather(dirs, runs, rep.notes)
    if "layers" in parts or "signals" in parts:
        rep.figures["gradients"] = why.gradient_figure(parts.get("layers"), parts.get("signals"))
    if "lesion" in parts:
        rep.figures["lesion"] = why.lesion_figure(parts["lesion"])
    if "shattered" in parts:
        rep.figures["shattered"] = why.shattered_figure(parts["shattered"])
    if parts:
        rep.tables["why"] = by_compared(lambda r: why.why_table({k: v[v["run_id"].isin(r["run_id"])]
                                                                 for k, v in parts.items()}, r), runs, rep.compared)


def _profile_frame(results_dir: Path) -> pd.DataFrame | None:
    files = sorted((results_dir / "profile").glob("*.parquet")) if (results_dir / "profile").is_dir() else []
    return pd.concat([records.read(f, "profile") for f in files], ignore_index=True) if files else None


def _responses(dirs: list[Path], runs: pd.DataFrame, rep: Report, compare: str | None) -> None:
    """Figure 7 from what `resbench diagnose` measured on the saved weights (analysis/responses.parquet)."""
    frames = []
    for d in dirs:
        mine = runs[runs["results_dir"] == str(d)]
        path = d / "analysis" / "responses.parquet"
        ok_ids = set(mine.loc[mine["status"] == "ok", "run_id"])
        resp = records.read(path, "responses") if path.exists() else None
        missing = ok_ids - (set(resp["run_id"]) if resp is not None else set()) - _preact_ids(mine)
        if missing:
            # every run missing: diagnose has not run (a count says it); some: those runs, by name
            which = "" if missing == ok_ids - _preact_ids(mine) else f" ({', '.join(sorted(missing))})"
            rep.notes.append(f"Figure 7 (layer responses) lacks {len(missing)} run(s) of {d}{which}: `resbench diagnose "
                             f"{d}` measures them on the saved weights")
        if resp is not None and len(resp):
            frames.append(resp[resp["run_id"].isin(ok_ids)])
    if frames:
        resp = pd.concat(frames, ignore_index=True)
        rep.figures["layer_responses"] = response_figure(resp, runs, compare)
        rep.tables["responses"] = resp


def _preact_ids(runs: pd.DataFrame) -> set:
    """Runs without Figure 7's response (after BN, before the addition): pre-activation nets and nets without BN."""
    return set(runs.loc[runs["pre_activation"].fillna(False) | ~runs["has_bn"].fillna(True), "run_id"])


def _md_table(df: pd.DataFrame) -> str:
    if not len(df):
        return "_none_\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    cell = lambda v: "-" if isinstance(v, float) and v != v else str(v).replace("|", "/").replace("\n", " ")  # noqa: E731
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


CAPTIONS = {
    "lr_grid": "The lr grid of a tuned sweep: each net's validation error at each lr of the grid (the mean over the "
               "evaluation points of the last quarter of the steps, averaged over the grid seeds). The lr with the "
               "lowest (large dot) is the one trained on the other seeds; a choice at an edge widens the grid by a "
               "factor 2 (at most twice a side), and one still at an edge means the grid did not bracket the best lr.",
    "training_curves": "Training curves in the style of He et al. Fig. 6: mean ± sd over the runs that trained; runs "
                       "that did not train or diverged are grey lines of their own.",
    "degradation": "Final training and test error against depth, mean ± sd over the runs that trained (He et al.'s "
                   "degradation problem is a training error that rises with depth). Grey x: a run that did not "
                   "train; dotted: chance.",
    "throughput": "Training throughput (median over timed windows; warm-up and evaluation excluded).",
    "layer_responses": "Std of layer responses in the style of He et al. Fig. 7.",
    "profile": "resbench profile: training img/s by configuration.",
    "gradients": "Gradients at each run's last evaluation point: per-parameter RMS of each weighted layer's gradient "
                 "(comparable across layer sizes), ||g|| ||W|| (unchanged by the scale of a weight in front of BN), "
                 "and the backward signal at each block's output (the gradient of one image's loss there, RMS over "
                 "its elements, averaged over two training batches). He et al. 2015 (sec. 4.1) argue that with BN "
                 "plain nets' backward signals do not vanish, so the degradation is not vanishing gradients: read "
                 "the signal panel for that.",
    "lesion": "Lesion study (Veit, Wilber and Belongie 2016, Residual Networks Behave Like Ensembles of Relatively "
              "Shallow Networks): test error with one block, or k random blocks, deleted at test time, at the block "
              "positions plain and residual twins can both lose; a residual net's downsampling blocks apart (x). "
              "Veit et al.'s reading: a residual net behaves like an ensemble of shallower paths, so losing one "
              "block costs little, while a plain net is one path.",
    "shattered": "Shattered gradients (Balduzzi et al. 2017): C(d), the cosine similarity of the input gradient (of the "
                 "predicted class's logit minus the mean logit) at a test image and at distance d along a random "
                 "line through it, both directions averaged; 1 for a linear map, towards 0 for gradients that "
                 "decorrelate (shatter). Initial nets' BN statistics are calibrated on training images first. "
                 "Balduzzi et al. argue plain nets' gradients shatter with depth and residual nets' far less.",
}


# (title, table, text): the report's table sections, in order
SECTIONS = [("Verdicts: every comparison, with its interval", "verdicts",
             "Each claim tested over seeds: a - b in percentage points (positive: the claim's direction) with "
             "its 95 % t-interval, paired by seed where both nets ran the same seeds on the same data (a seed "
             "fixes the data order), else Welch's unpaired test; p two-sided, Holm-corrected over the "
             "comparisons of this report. holds / reversed: Holm p < 0.05 in / against the claim's direction; "
             "not resolved: the seeds per net that would resolve a difference of this size at the observed "
             "spread (80 % power at 0.05 / m). Runs that did not train are not in the numbers (bench/verdicts.py)."),
            ("Each net at its tuned lr", "tuned",
             "A tuned sweep: per net and depth, the lr of the grid with the lowest validation error (averaged "
             "over the evaluation points of the last quarter of the steps and over the grid seeds), never the "
             "test error; a choice at an edge widened the grid by factors of 2 (at most twice a side); 'edge': "
             "still at the grid's smallest or largest lr, so a wider grid might find a better one. Train / test "
             "error of the chosen lr on the seeds that took no part in the choice (the grid seeds' runs are "
             "left out: their lr was picked for doing well on them), mean [95 % t-interval] over the runs that "
             "trained."),
            ("Comparison with He et al. 2015, Table 6", "comparison",
             f"Final test error. Source of the published numbers: {published.CITATION}. "
             "Plain nets are published only as curves (Fig. 6). Numbers from another recipe, width or data "
             "set are not comparable, and are marked so."),
            ("Comparison with He et al. 2015, Table 2 (ImageNet)", "imagenet",
             f"Source: {published.IMAGENET_CITATION}. Our fixed lr steps (epochs 30 and 60 of 90) stand for "
             "the paper's plateau rule; other data sets (Imagenette) have no published number here."),
            ("Final errors per net and depth", "final_errors",
             "Mean [95 % t-interval] over seeds (n seeds) of the final training and test error, from the last evaluation "
             "point, over the runs that trained; a cell with runs that did not train (final training error "
             "within 2 points of chance), diverged or failed says how many, and where no run trained shows "
             "the numbers of those that did not, marked so."),
            ("Each net's recipe", "recipes",
             "The recipe settings in which the nets differ, from the rows (a per-kind setting, or a method's own "
             "paper's settings under method_recipe = paper); the rest is shared, in the sweep spec below."),
            ("Published numbers for the methods", "published_methods",
             "Each with its source (bench/published.py); every one comes from another recipe or net, so they "
             "locate a method rather than set a target."),
            ("Why do plain nets degrade? Summary of the measures", "why",
             "Mean ± sd over seeds (n seeds): each seed's value is first averaged over its blocks, lesion draws, "
             "images or layers (medians for the gradients). C(d max): the gradient correlation at the end of "
             "the line; '-' where a net has no input gradient to correlate (a classifier that starts at zero, "
             "as Fixup's, at initialisation). 'sd over sets': the spread of the error over random lesion sets within a seed, "
             "averaged over seeds, apart from the spread over seeds."),
            ("Missing, failed and diverged runs, and runs that did not train", "status", ""),
            ("Hardware and software", "environment", ""),
            ("Profile: best configuration per model, mode and batch size", "profile",
             "img/s: median over timed blocks after warm-up; MFU against the dense peak at that precision."),
            ("Profile: the common pipeline against ours", "pipeline", "")]

FOLDED = ("environment", "status", "recipes")  # the HTML report folds these sections away
RESULTS_FIRST = ("verdicts", "tuned", "final_errors", "recipes", "comparison", "imagenet")  # tables before the figures


def _write_documents(dirs: list[Path], out: Path, fmt: str, rep: Report, compare: str | None) -> list[Path]:
    spec = "".join((f"# {d}\n" if len(dirs) > 1 else "")
                   + ((d / "sweep.toml").read_text() if (d / "sweep.toml").exists() else "(no sweep.toml)\n")
                   for d in dirs)
    title = " vs ".join(d.name for d in dirs)
    md = [f"# resbench report: {title}\n"]
    body = [f"<h1>resbench report: {html.escape(title)}</h1>"]
    for w in rep.warnings:
        md.append(f"**Warning:** {w}\n")
        body.append(f"<p><strong>Warning:</strong> {html.escape(w)}</p>")
    if compare:
        md.append(f"Compared by `{compare}`; folders: {', '.join(str(d) for d in dirs)}.\n")
        body.append(f"<p>Compared by <code>{html.escape(compare)}</code>; folders: "
                    f"{html.escape(', '.join(str(d) for d in dirs))}.</p>")
    if rep.summary:
        md.append("## What these runs show\n\n" + "\n".join(f"- {line}" for line in rep.summary)
                  + "\n\nFrom the verdicts table below; nothing else here is a claim.\n")
        body.append("<h2>What these runs show</h2><ul>" + "".join(
            f"<li>{html.escape(line).replace('**', '')}</li>" for line in rep.summary) + "</ul>")

    def tables(keys):
        for title, key, text in SECTIONS:
            # a section with nothing in it is left out (the status table's "none" says something: kept)
            if key not in keys or key not in rep.tables or (not len(rep.tables[key]) and key != "status"):
                continue
            df = rep.tables[key]
            md.append(f"## {title}\n\n{text}\n\n{_md_table(df)}")
            part = (f"<p>{html.escape(text)}</p>"
                    + (df.to_html(index=False, border=0, na_rep="-") if len(df) else "<p><em>none</em></p>"))
            # details a reader opens when needed: folded in the HTML
            body.append(f"<details><summary><h2 style='display:inline'>{html.escape(title)}</h2></summary>{part}</details>"
                        if key in FOLDED else f"<h2>{html.escape(title)}</h2>{part}")

    tables(RESULTS_FIRST)  # the numbers first, then the figures, then what explains and qualifies them
    for name, fig_path in ((n, out / f"{n}.{fmt}") for n in rep.figures):
        md.append(f"![{name}]({fig_path.name})\n\n{CAPTIONS.get(name, '')}\n")
        mime = {"png": "image/png", "svg": "image/svg+xml", "pdf": "application/pdf"}[fmt]
        b64 = base64.b64encode(fig_path.read_bytes()).decode()
        tag = (f'<img alt="{name}" src="data:{mime};base64,{b64}" style="max-width:100%">' if fmt != "pdf"
               else f'<embed type="{mime}" src="data:{mime};base64,{b64}" width="100%" height="420">')
        body.append(f"<figure>{tag}<figcaption>{html.escape(CAPTIONS.get(name, ''))}</figcaption></figure>")
    tables([key for _, key, _ in SECTIONS if key not in RESULTS_FIRST])
    if rep.notes:
        md.append("## Notes\n\n" + "\n".join(f"- {n}" for n in rep.notes) + "\n")
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in rep.notes) + "</ul>")
    md.append(f"## Sweep spec\n\n```toml\n{spec}```\n")
    body.append(f"<details><summary><h2 style='display:inline'>Sweep spec</h2></summary><pre>{html.escape(spec)}</pre>"
                f"</details>")
    md_path, html_path = out / "report.md", out / "report.html"
    records.atomic_write(md_path, lambda t: t.write_text("\n".join(md)))
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>resbench report</title><style>"
            "body{font-family:sans-serif;max-width:1000px;margin:auto}table{border-collapse:collapse}"
            "td,th{padding:2px 8px;border-bottom:1px solid #ddd}</style></head><body>" + "\n".join(body) + "</body></html>")
    records.atomic_write(html_path, lambda t: t.write_text(page))
    written = [md_path, html_path]
    found = rep.tables.get("verdict_rows")
    if found is not None and len(found):  # the verdicts as tidy rows, for a script (and the README's quotes)
        records.atomic_write(out / "verdicts.csv", lambda t: found.to_csv(t, index=False, float_format="%.6g"))
        written.append(out / "verdicts.csv")
    return written
