"""Verdicts (bench.verdicts) against hand-computed statistics and hand-made records: intervals, pairing by seed,
Holm's correction, the seeds a difference would need, and the words a report may use."""
import math

import numpy as np
import pandas as pd
import pytest

from bench import verdicts


def _runs(kind, depth, errs, seeds=None, net=None, **extra):
    seeds = range(len(errs)) if seeds is None else seeds
    return pd.DataFrame([dict(kind=kind, depth=depth, seed=s, net=net or {"resnet": "residual"}.get(kind, kind),
                              final_train_err=e, final_test_err=e, **extra) for s, e in zip(seeds, errs)])


def test_the_interval_of_a_mean_is_the_t_interval_by_hand():
    # 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.302653: 2 -+ 4.302653 / sqrt(3) = 2 -+ 2.484138
    assert verdicts.interval([1.0, 2.0, 3.0]) == pytest.approx((2.0, -0.484138, 4.484138), abs=1e-6)
    assert verdicts.mean_ci([1.0, 2.0, 3.0]) == "2.0 [-0.5, 4.5]"
    assert verdicts.mean_ci([5.0]) == "5.0" and verdicts.mean_ci([]) == "-"


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 -> non-decreasing: 0.03, 0.06, 0.06
    assert verdicts.holm([0.01, 0.04, 0.03]).tolist() == pytest.approx([0.03, 0.06, 0.06])
    out = verdicts.holm([0.5, float("nan"), 0.2])  # NaN neither counted nor changed: m = 2
    assert out[2] == pytest.approx(0.4) and math.isnan(out[1]) and out[0] == pytest.approx(0.5)


def test_seeds_needed_matches_the_textbook_power_of_a_t_test():
    # 80 % power at a two-sided 5 %: an effect of one sd needs 10 pairs (paired) or 17 per group (two samples)
    assert verdicts.seeds_needed(1.0, 1.0, paired=True) == 10
    assert verdicts.seeds_needed(1.0, 1.0, paired=False) == 17
    assert verdicts.seeds_needed(2.0, 1.0, paired=False) < 17  # a larger effect needs fewer
    assert verdicts.seeds_needed(1.0, 1.0, paired=True, alpha=0.005) > 10  # a stricter level needs more
    assert verdicts.seeds_needed(0.001, 1.0, paired=True) is None and verdicts.seeds_needed(1.0, 0.0, True) is None


def test_pairing_by_seed_where_both_nets_ran_the_same_seeds():
    a = pd.Series([10.0, 12.0, 14.0], index=[0, 1, 2])
    b = pd.Series([9.0, 10.5, 13.2], index=[0, 1, 2])
    paired = verdicts.difference(a, b)
    # the differences 1.0, 1.5, 0.8: mean 1.1, sd 0.36056, t = 1.1 / (0.36056 / sqrt 3) = 5.2842, 2 df: p = 0.0340
    assert paired["pairing"] == "paired by seed" and paired["difference"] == pytest.approx(1.1)
    assert paired["p"] == pytest.approx(0.0340, abs=2e-4)
    assert paired["ci_low"] == pytest.approx(1.1 - 4.302653 * 0.360555 / 3 ** 0.5, abs=1e-4)
    unpaired = verdicts.difference(a, b.set_axis([3, 4, 5]))  # other seeds: Welch, and a much weaker test
    assert unpaired["pairing"] == "unpaired (Welch)" and unpaired["p"] > 0.4


def test_one_distribution_is_not_resolved_and_well_separated_samples_hold_or_reverse():
    rng = np.random.default_rng(0)
    same = pd.concat([_runs("plain", 8, rng.normal(0.6, 0.02, 5)), _runs("plain", 44, rng.normal(0.6, 0.02, 5))])
    v = verdicts.comparisons(same)
    degr = v[v["question"] == "degradation"].iloc[0]
    assert degr["verdict"].startswith("not resolved at n = 5: about ") and degr["verdict"].endswith(
        "seeds per net would resolve a difference of this size at this spread")
    apart = pd.concat([_runs("plain", 8, [0.60, 0.61, 0.62, 0.60, 0.61]), _runs("plain", 44, [0.78, 0.80, 0.79, 0.77, 0.80]),
                       _runs("resnet", 8, [0.66, 0.67, 0.65, 0.66, 0.68]), _runs("resnet", 44, [0.55, 0.56, 0.54, 0.55, 0.56])])
    v = verdicts.comparisons(apart).set_index("claim")
    assert v.loc["plain: training error higher at depth 44 than at 8", "verdict"] == "holds"
    assert v.loc["residual: training error higher at depth 44 than at 8", "verdict"] == "reversed"
    assert v.loc["residual training error lower than plain at depth 44", "verdict"] == "holds"
    assert v.loc["residual training error lower than plain at depth 8", "verdict"] == "reversed"
    # the summary claims what holds or is reversed, and only counts the rest
    lines = verdicts.summary(verdicts.comparisons(apart))
    assert any(line.startswith("**holds**: plain: training error higher at depth 44 than at 8") for line in lines)
    assert not any("not resolved" in line and "**holds**" in line for line in lines)


def test_holm_turns_a_borderline_verdict_into_not_resolved():
    # one comparison at p = 0.017 holds alone (paired differences 3.0, 2.2, 3.5 points: t = 7.65, 2 df); among
    # many comparisons, Holm's correction leaves it unresolved
    a = _runs("plain", 8, [0.600, 0.610, 0.605])
    b = _runs("plain", 44, [0.630, 0.632, 0.640])
    alone = verdicts.comparisons(pd.concat([a, b]))
    row = alone[alone["question"] == "degradation"].iloc[0]
    assert row["p"] == pytest.approx(0.0167, abs=2e-4) and row["p_holm"] == row["p"] and row["verdict"] == "holds"
    others = pd.concat([a, b] + [_runs(k, d, [0.5, 0.52, 0.51]) for k in ("resnet", "fixup") for d in (8, 44)])
    crowded = verdicts.comparisons(others)
    row = crowded[crowded["claim"] == "plain: training error higher at depth 44 than at 8"].iloc[0]
    assert row["p"] == pytest.approx(alone.iloc[0]["p"]) and row["p_holm"] > 0.05
    assert row["verdict"].startswith("not resolved at n = 3")


def test_mixed_batches_are_never_compared_on_training_error():
    runs = pd.concat([_runs("resnet", d, [0.6, 0.61, 0.62]) for d in (20, 44)]
                     + [_runs("fixup", d, [0.7, 0.71, 0.72], mixup=1.0) for d in (20, 44)])
    runs["mixup"] = runs["mixup"].fillna(0.0)
    v = verdicts.comparisons(runs)
    fixup = v[v["claim"].str.contains("fixup")]
    assert set(fixup["metric"]) == {"test error"} and len(fixup) == 2  # against ResNet at 20 and 44, test error only
    assert "residual: training error higher at depth 44 than at 20" in set(v["claim"])


def test_each_compared_value_is_tested_against_the_first():
    runs = pd.concat([_runs("plain", 8, [0.6, 0.61, 0.62], compared="0.25"),
                      _runs("plain", 8, [0.7, 0.71, 0.72], compared="0.5")])
    v = verdicts.comparisons(runs, "width")
    row = v[v["question"] == "width compared"].iloc[0]
    assert row["claim"].startswith("plain-8: training error lower at width = 0.5 than at 0.25")
    assert row["verdict"] == "reversed" and row["difference"] == pytest.approx(-10.0)
