"""What became of a run, as the report, the tuning and the sweep's summary say it: trained, or not.

A run is recorded ``ok``, ``diverged`` (its loss turned non-finite) or ``failed`` (it raised). An ``ok``
run whose final training error stays within ``UNTRAINED_MARGIN`` of chance (1 - 1 / classes: 90 % on a
10-class set, so >= 88 %) "did not train": it finished, but learned next to nothing. Such runs are
results too (TAT at the BN nets' lr), and the report shows them, apart and marked, never pooled silently
with runs that trained.

Reads records only (pandas).
"""
from __future__ import annotations

import pandas as pd

from bench.datasets import SHAPES
from bench.verdicts import mean_ci

UNTRAINED_MARGIN = 0.02  # a final training error this close to chance (or above) is "did not train"
LATE_FRACTION = 0.25  # "late" evaluation points: those in the last quarter of a run's steps


def late(curves: pd.DataFrame, column: str) -> float:
    """The mean of ``column`` over a run's evaluation points in the last quarter of its steps (iteration at least
    3/4 of the last point's; the last point at least), its NaNs left out: less swayed by the last few batches
    than the final point alone. NaN where no point has a value."""
    have = curves[curves[column].notna()]
    if not len(have):
        return float("nan")
    last = have["iteration"].max()
    return float(have.loc[have["iteration"] >= (1 - LATE_FRACTION) * last, column].mean())


def late_val_err(runs: pd.DataFrame) -> pd.Series:
    """Per run: its late validation error (the row's ``late_val_err``, ``late`` of its curve); rows written
    before that column: the final validation error."""
    final = runs["final_val_err"].astype(float)
    v = runs["late_val_err"].astype(float)
    return v.where(v.notna(), final)


def chance_error(dataset: str) -> float:
    """The error of guessing: 1 - 1 / classes (10 classes where the data set is not one resbench knows)."""
    return 1 - 1 / (SHAPES[dataset][1] if dataset in SHAPES else 10)


def did_not_train(runs: pd.DataFrame) -> pd.Series:
    """Per run: ok, and its final training error within UNTRAINED_MARGIN of chance."""
    if not len(runs):
        return pd.Series(dtype=bool)
    chance = runs["dataset"].map(chance_error)
    return (runs["status"] == "ok") & (runs["final_train_err"] >= chance - UNTRAINED_MARGIN)


def label(runs: pd.DataFrame) -> pd.Series:
    """Per run: "trained", "did not train", "diverged" or "failed"."""
    out = runs["status"].where(runs["status"] != "ok", "trained")
    return out.where(~did_not_train(runs), "did not train")


def counts(runs: pd.DataFrame) -> str:
    """A cell's runs in words, '' when every one trained: "2 of 3 trained; 1 diverged"."""
    labels = label(runs)
    others = [f"{int((labels == k).sum())} {k}" for k in ("did not train", "diverged", "failed") if (labels == k).any()]
    return f"{int((labels == 'trained').sum())} of {len(runs)} trained; " + ", ".join(others) if others else ""


def error_cell(at: pd.DataFrame) -> str:
    """One net at one depth: 'train / test err %' mean [95 % t-interval] over the runs that trained, (n); and where any run
    did not train, diverged or failed, how many ("2 of 3 trained; 1 diverged"). When none trained, the numbers
    of those that did not, said so."""
    if not len(at):
        return "-"
    labels = label(at)
    good, untrained = at[labels == "trained"], at[labels == "did not train"]
    shown = good if len(good) else untrained
    numbers = (f"{mean_ci(100 * shown['final_train_err'])} / {mean_ci(100 * shown['final_test_err'])}"
               if len(shown) else "")
    said = counts(at)
    if not len(good) and len(shown):
        numbers = f"did not train: {numbers}"
    if not said:
        return f"{numbers} ({len(good)})"
    return f"{numbers} ({said})" if numbers else said
