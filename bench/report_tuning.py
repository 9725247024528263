"""The report's part for tuned sweeps (bench.tuning): how each net's validation error depends on the lr, and
each net at its chosen lr. Reads records only."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from bench import outcome, tuning
from bench.report_why import net_labels, net_order


def lr_figure(runs: pd.DataFrame):
    """Final validation error against the lr of each grid run (one panel per depth, one line per net; log lr).
    A diverged run is an x at the top of its panel, a run that did not train a hollow marker; the chosen lr of
    each net a large dot."""
    grid = runs[runs["lr_tuning"] == "grid"].assign(net=lambda d: net_labels(d))
    # one point per lr: the score the choice compares (late validation error, averaged over the grid seeds)
    grid = grid.assign(outcome=outcome.label(grid), val=100 * outcome.late_val_err(grid))
    grid = (grid.groupby(["net", "kind", "depth", "lr", "dataset"], as_index=False)
            .agg(val=("val", "mean"), status=("status", lambda s: "ok" if (s == "ok").all() else "diverged"),
                 outcome=("outcome", lambda o: "trained" if (o == "trained").all() else "did not train"),
                 seed=("seed", lambda v: ",".join(map(str, sorted(set(v)))))))
    depths = sorted(grid["depth"].unique())
    nets = net_order(grid["net"])
    colours = dict(zip(nets, sns.color_palette("tab10", len(nets))))
    picked = tuning.chosen(runs)
    fig, axes = plt.subplots(1, len(depths), figsize=(4.6 * len(depths) + 1.6, 3.8), squeeze=False, sharey=True)
    for ax, depth in zip(axes[0], depths):
        at = grid[grid["depth"] == depth]
        for net in nets:
            mine = at[(at["net"] == net) & (at["status"] == "ok")].sort_values("lr")
            if not len(mine):
                continue
            c = colours[net]
            ax.plot(mine["lr"], mine["val"], "-", color=c, lw=1.2, label=net)
            good = mine[mine["outcome"] == "trained"]
            ax.scatter(good["lr"], good["val"], color=c, s=14)
            bad = mine[mine["outcome"] == "did not train"]
            ax.scatter(bad["lr"], bad["val"], facecolors="none", edgecolors=c, s=22)
            kind = mine["kind"].iloc[0]
            if (kind, depth) in picked:
                best = mine[mine["lr"].map(lambda v, t=picked[(kind, depth)]: math.isclose(v, t))]
                ax.scatter(best["lr"], best["val"], color=c, s=80, zorder=3)
        div = at[at["status"] == "diverged"]
        for net, d in div.groupby("net"):
            ax.scatter(d["lr"], [101] * len(d), marker="x", color=colours[net], s=30, clip_on=False)
        ax.axhline(100 * outcome.chance_error(at["dataset"].iloc[0]), ls=":", lw=1, color="0.5")
        ax.set_xscale("log", base=2)
        lrs = sorted(at["lr"].unique())
        ax.set_xticks(lrs, [f"{v:g}" for v in lrs], rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_title(f"depth {depth}")
    axes[0][0].set_ylabel("late validation error (%)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1), frameon=False, title="net")
    seeds = ",".join(sorted(set(",".join(grid["seed"]).split(","))))
    fig.suptitle(f"The lr grid (seed {seeds}): validation error over the last quarter of the steps against the lr;\n"
                 f"large dot: the lr chosen; hollow: did not train; x: diverged; dotted: chance")
    fig.tight_layout()
    return fig


def tuned_table(every: pd.DataFrame, shown: pd.DataFrame) -> pd.DataFrame:
    """Per net and depth: the grid (and how far it widened at an edge), the chosen lr, whether it sits at an edge
    of the grid after widening as far as allowed (the grid could not bracket the best lr), the grid's diverged
    and untrained runs, the chosen lr's score on the grid seeds, and the final train / test error (%) of the
    chosen runs, on the seeds that took no part in the choice (bench.outcome.error_cell)."""
    cells = tuning.cells(every)
    shown = shown.assign(net=net_labels(shown), outcome=outcome.label(shown))
    seeds = ",".join(sorted(set(cells["grid_seeds"]))) if len(cells) else "-"
    rows = []
    for c in cells.itertuples():
        at = shown[(shown["kind"] == c.kind) & (shown["depth"] == c.depth)]
        net = at["net"].iloc[0] if len(at) else net_labels(every[every["kind"] == c.kind]).iloc[0]
        lrs = c.grid.split(",")
        state = {"waiting": f"no lr chosen yet ({c.recorded} of {c.grid_runs} grid runs recorded, {c.failed} failed)",
                 "widening": "no lr chosen yet (the grid widens at an edge)",
                 "none": "no lr chosen: every lr of the grid diverged"}.get(c.state)
        rows.append({"net": f"{net}-{c.depth}",
                     "lr grid": f"{len(lrs)} lrs, {lrs[0]}..{lrs[-1]}" + (f" (widened by {c.widened})" if c.widened else ""),
                     "chosen lr": "-" if math.isnan(c.chosen_lr) else f"{c.chosen_lr:g}",
                     "edge": c.edge or "-", "grid runs diverged": c.diverged, "grid runs that did not train": c.did_not_train,
                     f"val err % at chosen lr (grid seed {seeds})": "-" if math.isnan(c.val_err) else f"{100 * c.val_err:.1f}",
                     "train / test err % on fresh seeds (n)": state or outcome.error_cell(at) or "no fresh seed recorded yet"})
    order = {n: i for i, n in enumerate(net_order([r["net"].rsplit("-", 1)[0] for r in rows]))}
    rows.sort(key=lambda r: (int(r["net"].rsplit("-", 1)[1]), order[r["net"].rsplit("-", 1)[0]]))
    return pd.DataFrame(rows)
