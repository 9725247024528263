"""Tuned sweeps: each method at its best learning rate, beside the matched recipe.

A sweep with ``lr_grid`` (``resbench sweep --lr-grid``) trains, for each (kind, depth), every lr of the
grid on the sweep's first seed (the "grid" runs, ordinary runs with their own run_ids), chooses the lr
whose run ends with the lowest **validation** error (never the test error), and trains that lr on the
other seeds (the "chosen" runs): the protocol of DeepOBS (Schneider et al. 2019) and of Schmidt et al.
2021, "Descending through a crowded valley". A cell chooses once every grid run is recorded ok or
diverged (a failed run is retried by the next sweep, and could change the choice); diverged runs are
never chosen, nor are runs without a validation error.

Reads records only (pandas): the sweep, status and the report share these rules.
"""
from __future__ import annotations

import math

import pandas as pd

from bench import outcome
from bench.specs import RunSpec, SweepSpec

DONE = ("ok", "diverged")  # bench.records.DONE (kept here: this module needs no trainer, nor its imports)


def choose(grid: pd.DataFrame) -> float | None:
    """The lr of ``grid`` (one cell's grid runs) with the lowest final validation error among its ok runs
    (ties: the smaller lr); None if none has one."""
    ok = grid[(grid["status"] == "ok") & grid["final_val_err"].notna()]
    if not len(ok):
        return None
    return float(ok.sort_values(["final_val_err", "lr"], kind="stable")["lr"].iloc[0])


def _grid_rows(runs: pd.DataFrame) -> pd.DataFrame:
    if not len(runs) or "lr_tuning" not in runs:
        return runs.iloc[0:0]
    return runs[runs["lr_tuning"] == "grid"]


def chosen(runs: pd.DataFrame) -> dict[tuple[str, int], float]:
    """(kind, depth) -> the chosen lr, for every cell of ``runs`` (a folder's records, bench.records.load)
    whose grid runs are all recorded ok or diverged (``cells``)."""
    return {(r.kind, r.depth): r.chosen_lr for r in cells(runs).itertuples() if not math.isnan(r.chosen_lr)}


def cells(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per (kind, depth) of a tuned folder's grid: the grid, how many of its runs are recorded,
    diverged, failed or did not train (bench.outcome), the chosen lr and whether
    it sits at an edge of the grid (then the grid was too narrow to know the best lr), and its run's
    validation error. Cells still waiting for grid runs have no chosen lr."""
    rows = []
    grid_rows = _grid_rows(runs)
    for (kind, depth), cell in grid_rows.groupby(["kind", "depth"], sort=True) if len(grid_rows) else ():
        grid = sorted({float(v) for text in cell["lr_grid"] for v in str(text).split(",") if v})
        done = cell[cell["status"].isin(DONE)]
        complete = all(any(math.isclose(lr, v) for v in done["lr"]) for lr in grid)
        lr = choose(done) if complete else None
        untrained = int(outcome.did_not_train(cell).sum())
        edge = "" if lr is None else ("low edge" if math.isclose(lr, grid[0]) else
                                      "high edge" if math.isclose(lr, grid[-1]) else "")
        best = done[(done["status"] == "ok") & (done["lr"] == lr)] if lr is not None else done.iloc[0:0]
        rows.append(dict(kind=kind, depth=int(depth), grid=",".join(f"{v:g}" for v in grid), grid_runs=len(grid),
                         recorded=len(done), diverged=int((cell["status"] == "diverged").sum()),
                         failed=int((cell["status"] == "failed").sum()), did_not_train=untrained,
                         chosen_lr=lr if lr is not None else float("nan"), edge=edge,
                         val_err=float(best["final_val_err"].iloc[0]) if len(best) else float("nan")))
    return pd.DataFrame(rows, columns=["kind", "depth", "grid", "grid_runs", "recorded", "diverged", "failed",
                                       "did_not_train", "chosen_lr", "edge", "val_err"])


def at_chosen(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs a tuned folder's results are: each cell's runs at its chosen lr (the grid run on the first
    seed and the chosen runs on the others); runs of an untuned folder, all of them. The other grid runs
    are the tuning's cost, drawn apart (the report's lr figure)."""
    if "lr_tuning" not in runs or not (runs["lr_tuning"] == "grid").any():
        return runs
    picked = chosen(runs)
    keep = [t != "grid" or ((k, int(d)) in picked and math.isclose(lr, picked[(k, int(d))]))
            for t, k, d, lr in zip(runs["lr_tuning"], runs["kind"], runs["depth"], runs["lr"])]
    return runs[keep]


def expand(spec: SweepSpec, recorded: pd.DataFrame) -> list[RunSpec]:
    """The runs ``spec`` asks for, given the folder's records: every run of an untuned sweep; of a tuned one,
    the grid runs and the chosen runs of the cells whose grid is recorded."""
    return spec.runs(chosen(recorded) if spec.lr_grid else None)
