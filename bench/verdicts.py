"""Verdicts: which differences between nets a results folder shows, and which it cannot tell from seed noise.

A report that prints means leaves the reader to guess what they prove. Here every comparison the report
draws is a directed claim ("plain: training error higher at depth 44 than at 8", "residual lower than plain
at depth 20", "fixup lower than ResNet at depth 44", "width 0.25 lower than width 0.5") tested over seeds:

- the difference of the means (percentage points) with its 95 % t-interval: **paired by seed** where both
  nets ran the same seeds on the same data (a seed fixes the data order and augmentation: batch ``i`` is a
  function of (seed, i), bench.data), so each seed's difference is one observation (``ttest_rel``);
  otherwise **unpaired** (Welch's ``ttest_ind``, unequal variances);
- the two-sided p-value, then corrected for the number of comparisons in the report by Holm's step-down
  procedure (Holm 1979), so that one report's many comparisons do not find differences by chance;
- the verdict: **holds** (Holm p < 0.05, in the claimed direction), **reversed** (Holm p < 0.05, the other
  way), or **not resolved at n = k**, with the seeds per net that would resolve a difference of this size at
  this spread (80 % power in a two-sided t-test at 0.05 / m for the report's m comparisons, the strictest
  step of Holm's; from the observed sd, so itself rough);
- a trend across every depth of a kind (least-squares slope of training error on depth, ``linregress``)
  beside the shallowest-to-deepest difference.

Means in tables get a 95 % t-interval over seeds (``interval``). Runs that did not train, diverged or failed
are not in the numbers (bench.outcome), as in the report's means; training errors measured on mixed
batches (mixup) are not compared with others. Reads records only (pandas, scipy.stats).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

ALPHA = 0.05  # each verdict's level, after Holm's correction over the report's comparisons
POWER = 0.8  # the power "seeds that would resolve it" aims at
MAX_SEEDS = 1000  # beyond this, "more than 1000 seeds"
COLUMNS = ["question", "claim", "metric", "compared", "a", "b", "n_a", "n_b", "pairing", "mean_a", "mean_b",
           "difference", "ci_low", "ci_high", "p", "p_holm", "verdict", "seeds_needed"]
METRICS = {"final_train_err": "training error", "final_test_err": "test error"}


def _stats():
    """scipy.stats, imported at first use: the training path imports this module (through bench.outcome) and
    each worker process would otherwise pay scipy's import (about 1 s) for nothing."""
    from scipy import stats

    return stats


def interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the t-interval of the mean over seeds; low and high NaN below 2 values."""
    v = np.asarray(pd.Series(values).dropna(), dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    mean = float(v.mean())
    if len(v) < 2:
        return mean, math.nan, math.nan
    if np.ptp(v) == 0:
        return mean, mean, mean
    low, high = _stats().ttest_1samp(v, 0.0).confidence_interval(confidence)
    return mean, float(low), float(high)


def mean_ci(values, digits: int = 1) -> str:
    """'62.9 [62.1, 63.7]': the mean and its 95 % t-interval over seeds (the mean alone below 2 values)."""
    mean, low, high = interval(values)
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(low) else f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def holm(p) -> np.ndarray:
    """Holm's step-down adjustment of ``p`` (NaNs kept as NaN, not counted): the i-th smallest of m p-values
    times (m - i + 1), made non-decreasing, at most 1."""
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    have = np.flatnonzero(~np.isnan(p))
    m = len(have)
    order = have[np.argsort(p[have], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        out[idx] = running
    return out


def seeds_needed(difference: float, sd: float, paired: bool, alpha: float = ALPHA) -> int | None:
    """Seeds per net for a two-sided t-test at level ``alpha`` to detect ``difference`` with POWER, given the sd
    (of the per-seed differences when paired, else of one net's values); None beyond MAX_SEEDS or with no
    spread."""
    if not (sd > 0) or difference == 0 or math.isnan(difference):
        return None
    d, stats = abs(difference) / sd, _stats()
    for n in range(2, MAX_SEEDS + 1):
        df, ncp = (n - 1, d * math.sqrt(n)) if paired else (2 * n - 2, d * math.sqrt(n / 2))
        crit = stats.t.ppf(1 - alpha / 2, df)
        power = stats.nct.sf(crit, df, ncp) + stats.nct.cdf(-crit, df, ncp)
        if power >= POWER:
            return n
    return None


def difference(a: pd.Series, b: pd.Series) -> dict:
    """a - b (seed-indexed values, in points): paired by seed where both hold the same seeds (at least 2),
    else Welch's unpaired test. Returns the difference, its 95 % interval, p, the pairing and the spread."""
    a, b = a.dropna(), b.dropna()
    paired = len(a) >= 2 and set(a.index) == set(b.index)
    out = dict(n_a=len(a), n_b=len(b), mean_a=float(a.mean()) if len(a) else math.nan,
               mean_b=float(b.mean()) if len(b) else math.nan, pairing="paired by seed" if paired else "unpaired (Welch)")
    out["difference"] = out["mean_a"] - out["mean_b"]
    if len(a) < 2 or len(b) < 2:
        return out | dict(ci_low=math.nan, ci_high=math.nan, p=math.nan, sd=math.nan, pairing="-")
    if paired:
        d = a - b.reindex(a.index)
        sd = float(d.std())
        if sd == 0:  # every seed the same difference (bit-identical runs, say): no spread to test against
            return out | dict(ci_low=out["difference"], ci_high=out["difference"], p=0.0 if out["difference"] else 1.0,
                              sd=0.0)
        res = _stats().ttest_rel(a, b.reindex(a.index))
    else:
        sd = float(math.sqrt((a.var() + b.var()) / 2))
        if a.var() == 0 and b.var() == 0:
            return out | dict(ci_low=out["difference"], ci_high=out["difference"], p=0.0 if out["difference"] else 1.0,
                              sd=0.0)
        res = _stats().ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(0.95)
    return out | dict(ci_low=float(ci.low), ci_high=float(ci.high), p=float(res.pvalue), sd=sd)


def trend(runs: pd.DataFrame, metric: str) -> dict:
    """The least-squares slope of ``metric`` (points) on depth over the runs, per 10 layers, with its 95 %
    interval and two-sided p (``scipy.stats.linregress``)."""
    x, y = runs["depth"].astype(float).to_numpy(), 100 * runs[metric].astype(float).to_numpy()
    if len(set(x)) < 3 or len(x) < 4:
        return dict(difference=math.nan, ci_low=math.nan, ci_high=math.nan, p=math.nan)
    stats = _stats()
    res = stats.linregress(x, y)
    half = stats.t.ppf(0.975, len(x) - 2) * res.stderr
    return dict(difference=10 * res.slope, ci_low=10 * (res.slope - half), ci_high=10 * (res.slope + half),
                p=float(res.pvalue))


def _values(runs: pd.DataFrame, metric: str) -> pd.Series:
    """Seed-indexed percentages (one run per seed; a repeated seed keeps its first run)."""
    r = runs.drop_duplicates("seed")
    return pd.Series(100 * r[metric].astype(float).to_numpy(), index=r["seed"].astype(int).to_numpy())


def _mixed(runs: pd.DataFrame) -> bool:
    return "mixup" in runs and bool((runs["mixup"].fillna(0) > 0).any())


def _row(question: str, claim: str, metric: str, a_label: str, b_label: str, a: pd.DataFrame, b: pd.DataFrame,
         compared: str = "") -> dict:
    res = difference(_values(a, metric), _values(b, metric))
    return dict(question=question, claim=claim, metric=METRICS[metric], compared=compared, a=a_label, b=b_label,
                **{k: res[k] for k in ("n_a", "n_b", "pairing", "mean_a", "mean_b", "difference", "ci_low",
                                       "ci_high", "p")}, _sd=res["sd"])


def _within(runs: pd.DataFrame, compared: str) -> list[dict]:
    """The comparisons inside one set of runs: degradation per kind, residual against plain, each method
    against ResNet, at each depth."""
    rows = []
    for kind, mine in runs.groupby("kind", sort=False):
        depths = sorted(mine["depth"].unique())
        if len(depths) < 2 or _mixed(mine):
            continue
        net = mine["net"].iloc[0]
        lo, hi = mine[mine["depth"] == depths[0]], mine[mine["depth"] == depths[-1]]
        rows.append(_row("degradation", f"{net}: training error higher at depth {depths[-1]} than at {depths[0]}",
                         "final_train_err", f"{net}-{depths[-1]}", f"{net}-{depths[0]}", hi, lo, compared))
        t = trend(mine, "final_train_err")
        if not math.isnan(t["p"]):
            rows.append(dict(question="degradation trend", claim=f"{net}: training error rises with depth "
                             f"({', '.join(map(str, depths))}; slope per 10 layers)", metric="training error",
                             compared=compared, a=net, b="", n_a=len(mine), n_b=0, pairing="regression on depth",
                             mean_a=math.nan, mean_b=math.nan, **t, _sd=math.nan))
    base = runs[runs["kind"] == "resnet"]
    for depth in sorted(runs["depth"].unique()):
        at = runs[runs["depth"] == depth]
        res = at[at["kind"] == "resnet"]
        plain = at[at["kind"] == "plain"]
        for metric in METRICS:
            if len(res) and len(plain):
                rows.append(_row("residual against plain", f"residual {METRICS[metric]} lower than plain at depth "
                                 f"{depth}", metric, f"plain-{depth}", f"residual-{depth}", plain, res, compared))
            for kind, other in at[~at["kind"].isin(["resnet", "plain"])].groupby("kind", sort=False):
                if not len(res) or not len(base) or (metric == "final_train_err" and _mixed(other)):
                    continue
                net = other["net"].iloc[0]
                rows.append(_row("method against ResNet", f"{net} {METRICS[metric]} lower than ResNet at depth {depth}",
                                 metric, f"residual-{depth}", f"{net}-{depth}", res, other, compared))
    return rows


def _across(runs: pd.DataFrame, compare: str, column: str = "compared") -> list[dict]:
    """Each compared value against the first, per net and depth, for both metrics."""
    values = sorted(runs[column].unique())
    rows = []
    for (net, depth), at in runs.groupby(["net", "depth"], sort=True):
        first = at[at[column] == values[0]]
        for v in values[1:]:
            other = at[at[column] == v]
            if not len(first) or not len(other):
                continue
            for metric in METRICS:
                if metric == "final_train_err" and (_mixed(other) != _mixed(first)):
                    continue
                rows.append(_row(f"{compare} compared", f"{net}-{depth}: {METRICS[metric]} lower at {compare} = {v} "
                                 f"than at {values[0]}", metric, f"{net}-{depth} [{values[0]}]", f"{net}-{depth} [{v}]",
                                 first, other, compared=f"{v} vs {values[0]}"))
    return rows


def verdict_text(difference: float, p_holm: float, n: int, seeds: int | None) -> str:
    if not math.isnan(p_holm) and p_holm < ALPHA:
        return "holds" if difference > 0 else "reversed"
    if math.isnan(p_holm):
        return f"not resolved at n = {n}: needs at least 2 seeds per net"
    need = ("more than 1000 seeds per net would be needed to resolve a difference this small at this spread"
            if seeds is None else f"about {seeds} seeds per net would resolve a difference of this size at this "
            f"spread")
    return f"not resolved at n = {n}: {need}"


def comparisons(runs: pd.DataFrame, compare: str | None = None, column: str = "compared") -> pd.DataFrame:
    """Every comparison the report draws, over ``runs`` (the runs that trained, with a ``net`` label: a tuned
    folder's chosen runs only), as tidy rows (COLUMNS), Holm-corrected over all of them. With ``compare``
    (the --compare-by column; values in ``column``) the comparisons are made within each compared value,
    and each value is compared with the first."""
    if not len(runs):
        return pd.DataFrame(columns=COLUMNS)
    # every claim is "a higher than b" (a "lower than" claim names its nets the other way round): a positive
    # difference a - b is the claim's direction
    if compare:
        rows = [r for v, g in runs.groupby(column, sort=True) for r in _within(g, str(v))] + _across(runs, compare, column)
    else:
        rows = _within(runs, "")
    df = pd.DataFrame(rows)
    if not len(df):
        return pd.DataFrame(columns=COLUMNS)
    df["p_holm"] = holm(df["p"])
    trend_row = (df["question"] == "degradation trend").to_numpy()
    # at the level a verdict faces after the correction (Bonferroni's alpha / m, the strictest step of Holm's)
    need = [None if t else seeds_needed(d, sd, pairing == "paired by seed", ALPHA / len(df))
            for d, sd, pairing, t in zip(df["difference"], df["_sd"], df["pairing"], trend_row)]
    n = df[["n_a", "n_b"]].replace(0, np.nan).min(axis=1).fillna(df["n_a"]).astype(int)
    df["verdict"] = [verdict_text(d, p, k, s) if not t or (p == p and p < ALPHA) else f"not resolved over {k} runs"
                     for d, p, k, s, t in zip(df["difference"], df["p_holm"], n, need, trend_row)]
    df["seeds_needed"] = pd.array(need, dtype="Int64")
    return df[COLUMNS]


def summary(table: pd.DataFrame) -> list[str]:
    """What the runs show, in sentences: each claim that holds or is reversed with its numbers, then the
    questions left open (how many, and the nearest to resolving). Claims nothing the table does not support."""
    if not len(table):
        return []
    lines = []
    for r in table.itertuples():
        if r.verdict not in ("holds", "reversed"):
            continue
        unit = " points per 10 layers" if r.question == "degradation trend" else " points"
        where = f" [{r.compared}]" if r.compared and r.question != f"{r.compared}" else ""
        means = f"{r.a} {r.mean_a:.1f} % vs {r.b} {r.mean_b:.1f} %, " if r.n_b else ""
        lines.append(f"**{r.verdict}**: {r.claim}{where} — {means}{r.difference:+.1f}{unit} (95 % CI {r.ci_low:+.1f} to "
                     f"{r.ci_high:+.1f}; {r.pairing}, n = {min(v for v in (r.n_a, r.n_b) if v) if r.n_b else r.n_a}; "
                     f"Holm p {_p(r.p_holm, '= ')})")
    open_ = table[~table["verdict"].isin(["holds", "reversed"])]
    if len(open_):
        lines.append(f"**not resolved**: {len(open_)} of {len(table)} comparisons (listed in the verdicts table with "
                     f"the seeds each would need)")
    return lines


def _p(p: float, eq: str = "") -> str:
    return "-" if math.isnan(p) else ("< 0.001" if p < 0.001 else f"{eq}{p:.3f}")


def table(df: pd.DataFrame) -> pd.DataFrame:
    """The verdicts as the report prints them (rounded, in words)."""
    if not len(df):
        return df
    fmt = lambda v, s="": "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{s}.1f}"  # noqa: E731
    return pd.DataFrame({
        "claim": df["claim"] + np.where(df["compared"].astype(str) != "", " [" + df["compared"].astype(str) + "]", ""),
        "n": [f"{a}" if not b else f"{a} / {b}" for a, b in zip(df["n_a"], df["n_b"])],
        "a vs b": [f"{a} vs {b}" if b else a for a, b in zip(df["a"], df["b"])],
        "means, a vs b (%)": [f"{fmt(a)} vs {fmt(b)}" if not math.isnan(a) else "-"
                              for a, b in zip(df["mean_a"], df["mean_b"])],
        "a - b, points (95 % CI)": [f"{fmt(d, '+')} ({fmt(lo, '+')} to {fmt(hi, '+')})"
                                         for d, lo, hi in zip(df["difference"], df["ci_low"], df["ci_high"])],
        "test": df["pairing"], "p": df["p"].map(_p), "Holm p": df["p_holm"].map(_p), "verdict": df["verdict"]})
