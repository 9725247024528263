"""Tuned sweeps: each method at its best learning rate, beside the matched recipe.

A sweep with ``lr_grid`` (``resbench sweep --lr-grid``) trains, for each (kind, depth), every lr of the grid
on the sweep's first ``grid_seeds`` seeds (the "grid" runs, ordinary runs with their own run_ids), chooses
the lr with the lowest **validation** error (never the test error), and trains that lr on the other seeds
(the "chosen" runs): the protocol of DeepOBS (Schneider et al. 2019) and of Schmidt et al. 2021,
"Descending through a crowded valley". The results are the chosen runs only: a grid run that won the
choice was picked for a low validation error, partly luck, and would pull the mean down (the winner's
curse), so the grid seeds are the tuning's cost, shown apart.

The score of an lr is the mean over its grid seeds of each run's late validation error (the mean over the
evaluation points of the last quarter of its steps, ``outcome.late``): one snapshot swings with the last
batches. An lr with a diverged grid run is never chosen, nor one without a validation error. A cell chooses
once every lr of its grid is recorded ok or diverged on every grid seed (a failed run is retried by the next
sweep, and could change the choice). A choice at an edge of the grid widens it by one factor-2 step on that
side, up to ``--lr-grid-widen`` steps (``lr_grid_widen``, 2 by default): the cell chooses again once the new
lr is recorded. At the bound the
choice is flagged as an edge.

Reads records only (pandas; no torch): the sweep (bench.sweep.expand), status and the report share these rules.
"""
from __future__ import annotations

import math

import pandas as pd

from bench import outcome

DONE = ("ok", "diverged")  # bench.records.DONE (kept here: this module needs no trainer, nor its imports)
MAX_WIDEN = 2  # factor-2 steps a cell's grid may grow beyond each end of the sweep's grid (rows of v1: no column)
CELL_COLUMNS = ["kind", "depth", "grid", "grid_seeds", "grid_runs", "recorded", "diverged", "failed", "did_not_train",
                "widened", "state", "chosen_lr", "edge", "val_err"]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9)


def scores(grid: pd.DataFrame) -> pd.DataFrame:
    """Per lr of one cell's recorded grid runs: the mean late validation error over its grid seeds (``score``),
    how many seeds it has, and whether it may be chosen (every run ok with a validation error)."""
    g = grid.assign(late=outcome.late_val_err(grid))
    rows = [dict(lr=float(lr), score=at["late"].mean(), seeds=at["seed"].nunique(),
                 eligible=bool((at["status"] == "ok").all() and at["late"].notna().all()))
            for lr, at in g.groupby("lr", sort=True)]
    return pd.DataFrame(rows, columns=["lr", "score", "seeds", "eligible"])


def choose(grid: pd.DataFrame) -> float | None:
    """The lr of ``grid`` (one cell's grid runs) with the lowest score (``scores``) among the eligible lrs
    (ties: the smaller lr); None if none is eligible."""
    s = scores(grid)
    s = s[s["eligible"]]
    if not len(s):
        return None
    return float(s.sort_values(["score", "lr"], kind="stable")["lr"].iloc[0])


def _grid_rows(runs: pd.DataFrame) -> pd.DataFrame:
    if not len(runs):
        return runs.iloc[0:0]
    return runs[runs["lr_tuning"] == "grid"]


def _values(cells) -> list[float]:
    """The distinct numbers of a list column's cells (lr_grid, lr_grid_seeds), sorted."""
    return sorted({float(v) for cell in cells if cell is not None and not isinstance(cell, float) for v in cell})


def _cell(kind: str, depth: int, cell: pd.DataFrame) -> dict:
    """One cell's state from its grid runs: the sweep's grid for it (``lr_grid``), the lrs it has grown by,
    its grid seeds (``lr_grid_seeds``; rows of earlier versions: the seeds recorded), whether it waits for runs,
    widens at an edge, or has chosen."""
    base = _values(cell["lr_grid"])
    # rows of version 1 have no grid seeds: the seeds their grid runs were recorded on
    seeds = [int(v) for v in _values(cell["lr_grid_seeds"])] or sorted(set(cell["seed"].astype(int)))
    lrs = sorted(set(base) | {float(v) for v in cell["lr"]}, key=float)
    grid = [lr for i, lr in enumerate(lrs) if not any(_close(lr, o) for o in lrs[:i])]
    done = cell[cell["status"].isin(DONE)]
    complete = all(any(_close(lr, v) and s == seed for v, s in zip(done["lr"], done["seed"]))
                   for lr in grid for seed in seeds)
    lr = choose(done) if complete else None
    above = sum(v > base[-1] and not _close(v, base[-1]) for v in grid)
    below = sum(v < base[0] and not _close(v, base[0]) for v in grid)
    edge = "" if lr is None else ("low edge" if _close(lr, grid[0]) else "high edge" if _close(lr, grid[-1]) else "")
    bound = int(cell["lr_grid_widen"].dropna().max()) if cell["lr_grid_widen"].notna().any() else MAX_WIDEN
    widen = None
    if edge == "high edge" and above < bound:
        widen = lr * 2
    elif edge == "low edge" and below < bound:
        widen = lr / 2
    state = "waiting" if not complete else "widening" if widen is not None else "chosen" if lr is not None else "none"
    s = scores(done)
    best = s[s["lr"].map(lambda v: _close(v, lr))] if lr is not None else s.iloc[0:0]
    return dict(kind=kind, depth=int(depth), grid=",".join(f"{v:g}" for v in grid),
                grid_seeds=",".join(map(str, seeds)), grid_runs=len(grid) * len(seeds), recorded=len(done),
                diverged=int((cell["status"] == "diverged").sum()), failed=int((cell["status"] == "failed").sum()),
                did_not_train=int(outcome.did_not_train(cell).sum()), widened=above + below, state=state,
                chosen_lr=lr if state == "chosen" else float("nan"), edge=edge if state == "chosen" else "",
                val_err=float(best["score"].iloc[0]) if len(best) and state == "chosen" else float("nan"),
                _widen=widen, _grid=tuple(grid))


def _cells(runs: pd.DataFrame) -> list[dict]:
    g = _grid_rows(runs)
    return [_cell(kind, depth, cell) for (kind, depth), cell in g.groupby(["kind", "depth"], sort=True)] if len(g) else []


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (kind, depth) of a tuned folder's grid: the grid as it stands (widened at an edge), the grid
    seeds, how many grid runs it needs and has recorded, diverged, failed or did not train (bench.outcome), how
    many lrs it grew by, its state (waiting for runs, widening at an edge, chosen; "none": every lr diverged),
    the chosen lr, whether it sits at an edge of the grid after widening as far as allowed (then the grid
    could not bracket the best lr), and its score (mean late validation error over the grid seeds)."""
    return pd.DataFrame([{k: v for k, v in c.items() if not k.startswith("_")} for c in _cells(runs)],
                        columns=CELL_COLUMNS)


def chosen(runs: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(kind, depth) -> the chosen lr, for every cell of ``runs`` (a folder's records) that has chosen."""
    return {(c["kind"], c["depth"]): c["chosen_lr"] for c in _cells(runs) if c["state"] == "chosen"}


def grids(runs: pd.DataFrame) -> dict[tuple[str, int], tuple[float, ...]]:
    """(kind, depth) -> the lrs its grid runs are to cover now: the recorded grid, and the next lr of a cell
    widening at an edge."""
    return {(c["kind"], c["depth"]): tuple(sorted(c["_grid"] + ((c["_widen"],) if c["_widen"] else ())))
            for c in _cells(runs)}


def at_chosen(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a tuned folder's results are: each cell's chosen runs, on seeds that took no part in the
    choice; runs of an untuned folder, all of them. The grid runs are the tuning's cost, drawn apart (the
    report's lr figure): the grid run at the chosen lr won the choice partly by luck."""
    if not (runs["lr_tuning"] == "grid").any():
        return runs
    picked = chosen(runs)
    keep = [t == "chosen" and (k, int(d)) in picked and _close(lr, picked[(k, int(d))])
            for t, k, d, lr in zip(runs["lr_tuning"], runs["kind"], runs["depth"], runs["lr"])]
    return runs[keep]
