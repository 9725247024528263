"""The methods compared fairly: per-kind settings, the methods' own recipes, and the tuned axis (an lr grid on
the first seed, the lr with the lowest validation error on the others), against hand-made records and real
tiny sweeps."""
import math
import tomllib
from dataclasses import replace

import pandas as pd
import pytest
from click.testing import CliRunner

from bench import records, tuning
from bench.cli import main
from bench.specs import LR_GRIDS, RunSpec, SweepSpec, recipe


def _grid_row(kind, depth, lr, val, test=0.5, status="ok", train=0.5, grid=(0.01, 0.1, 1.0), seed=0, late=None,
              seeds=(0,), widen=2):
    return dict(kind=kind, depth=depth, lr=lr, final_val_err=val, late_val_err=val if late is None else late,
                final_test_err=test, status=status, final_train_err=train, lr_tuning="grid", seed=seed,
                lr_grid=tuple(grid), lr_grid_seeds=tuple(seeds), lr_grid_widen=widen, dataset="cifar10")


def test_the_lr_is_chosen_on_validation_error_never_on_test_error():
    rows = pd.DataFrame([_grid_row("fixup", 20, 0.01, val=0.40, test=0.10),  # the best test error
                         _grid_row("fixup", 20, 0.1, val=0.30, test=0.60),  # the best validation error
                         _grid_row("fixup", 20, 1.0, val=0.35, test=0.20)])
    assert tuning.choose(rows) == 0.1
    assert tuning.chosen(rows) == {("fixup", 20): 0.1}
    cell = tuning.cells(rows).iloc[0]
    assert (cell["chosen_lr"], cell["edge"], cell["val_err"], cell["recorded"]) == (0.1, "", 0.30, 3)


def test_a_diverged_or_failed_grid_run_is_never_chosen_and_a_failed_one_holds_the_choice_back():
    diverged = pd.DataFrame([_grid_row("tat", 20, 0.01, val=0.60), _grid_row("tat", 20, 0.1, val=0.50),
                             _grid_row("tat", 20, 1.0, val=0.10, status="diverged")])
    assert tuning.chosen(diverged) == {("tat", 20): 0.1}
    assert tuning.cells(diverged).iloc[0][["diverged", "edge"]].tolist() == [1, ""]
    # a failed run is retried by the next sweep and might then win: no choice until it is recorded
    failed = diverged.assign(status=["ok", "failed", "ok"], late_val_err=[0.5, 0.1, 0.6])
    assert tuning.chosen(failed) == {} and math.isnan(tuning.cells(failed).iloc[0]["chosen_lr"])
    assert tuning.choose(failed[failed["status"] == "ok"]) == 0.01
    # nothing trained without diverging: nothing to choose
    assert tuning.chosen(diverged.assign(status="diverged")) == {}
    # ties go to the smaller lr
    assert tuning.choose(pd.DataFrame([_grid_row("x", 8, 1.0, 0.2), _grid_row("x", 8, 0.1, 0.2)])) == 0.1


def test_the_choice_is_the_lowest_late_validation_error_averaged_over_the_grid_seeds():
    # lr 0.1 has the best final snapshot on seed 0, lr 0.01 the lowest late error (mean of the last quarter's
    # points) averaged over both grid seeds: 0.01 is chosen
    kw = dict(seeds=(0, 1), grid=(0.001, 0.01, 0.1, 1.0))
    rows = pd.DataFrame([_grid_row("resnet", 8, 0.01, val=0.35, late=0.30, seed=0, **kw),
                         _grid_row("resnet", 8, 0.01, val=0.33, late=0.32, seed=1, **kw),
                         _grid_row("resnet", 8, 0.1, val=0.20, late=0.28, seed=0, **kw),
                         _grid_row("resnet", 8, 0.1, val=0.40, late=0.40, seed=1, **kw)]
                        + [_grid_row("resnet", 8, lr, val=0.50, seed=s, **kw) for lr in (0.001, 1.0) for s in (0, 1)])
    assert tuning.chosen(rows) == {("resnet", 8): 0.01}
    assert tuning.cells(rows).iloc[0][["val_err", "grid_seeds", "grid_runs", "state", "edge"]].tolist() == [
        pytest.approx(0.31), "0,1", 8, "chosen", ""]
    # the second grid seed not recorded yet at lr 1.0: no choice
    assert tuning.chosen(rows.iloc[:7]) == {} and tuning.cells(rows.iloc[:7]).iloc[0]["state"] == "waiting"
    # an lr where one grid seed diverged is never chosen, however good the other seed
    one_diverged = rows.assign(status=["ok", "diverged"] + ["ok"] * 6)
    assert tuning.choose(one_diverged) == 0.1
    # rows of earlier versions have no late error: their final validation error stands in
    assert tuning.choose(rows.assign(late_val_err=float("nan"))) == 0.1


def test_a_choice_at_an_edge_widens_the_grid_by_factors_of_two_up_to_the_bound():
    base = (0.01, 0.1, 1.0)
    rows = pd.DataFrame([_grid_row("dirac", 20, lr, val={0.01: 0.4, 0.1: 0.3, 1.0: 0.2}[lr]) for lr in base])
    cell = tuning.cells(rows).iloc[0]
    assert (cell["state"], tuning.chosen(rows)) == ("widening", {})
    assert tuning.grids(rows) == {("dirac", 20): (0.01, 0.1, 1.0, 2.0)}
    # the widened lr is better again: one more step, then the bound (two steps) ends the widening, flagged
    more = pd.concat([rows, pd.DataFrame([_grid_row("dirac", 20, 2.0, val=0.15, grid=base)])])
    assert tuning.grids(more)[("dirac", 20)] == (0.01, 0.1, 1.0, 2.0, 4.0)
    bound = pd.concat([more, pd.DataFrame([_grid_row("dirac", 20, 4.0, val=0.1, grid=base)])])
    cell = tuning.cells(bound).iloc[0]
    assert (cell["state"], cell["chosen_lr"], cell["edge"], cell["widened"]) == ("chosen", 4.0, "high edge", 2)
    # a widened lr that is worse (or diverges) makes the choice interior: no flag
    worse = pd.concat([rows, pd.DataFrame([_grid_row("dirac", 20, 2.0, val=0.9, status="diverged", grid=base)])])
    cell = tuning.cells(worse).iloc[0]
    assert (cell["state"], cell["chosen_lr"], cell["edge"], cell["widened"]) == ("chosen", 1.0, "", 1)
    # downwards likewise
    low = pd.DataFrame([_grid_row("tat", 20, lr, val={0.01: 0.2, 0.1: 0.3, 1.0: 0.4}[lr]) for lr in base])
    assert tuning.grids(low)[("tat", 20)] == (0.005, 0.01, 0.1, 1.0)
    assert tuning.MAX_WIDEN == 2
    # --lr-grid-widen 0: the grid never grows, the edge is flagged at once
    never = pd.DataFrame([_grid_row("tat", 20, lr, val={0.01: 0.2, 0.1: 0.3, 1.0: 0.4}[lr], widen=0) for lr in base])
    assert tuning.chosen(never) == {("tat", 20): 0.01} and tuning.cells(never).iloc[0]["edge"] == "low edge"


def test_the_results_of_a_tuned_folder_are_its_chosen_runs_never_a_grid_seed():
    rows = pd.DataFrame([_grid_row("plain", 8, lr, val={0.01: 0.4, 0.1: 0.3, 1.0: 0.5}[lr]) for lr in (0.01, 0.1, 1.0)])
    chosen = [dict(_grid_row("plain", 8, 0.1, val=0.35), lr_tuning="chosen", seed=s) for s in (1, 2)]
    runs = pd.concat([rows, pd.DataFrame(chosen)], ignore_index=True)
    shown = tuning.at_chosen(runs)
    assert sorted(shown["seed"]) == [1, 2] and set(shown["lr_tuning"]) == {"chosen"}


def test_a_cell_waits_for_every_lr_of_its_grid_and_counts_runs_that_did_not_train():
    rows = pd.DataFrame([_grid_row("plain", 8, 0.01, 0.4), _grid_row("plain", 8, 0.1, 0.3, train=0.89)])
    assert tuning.chosen(rows) == {}  # 1.0 not recorded yet
    more = pd.concat([rows, pd.DataFrame([_grid_row("plain", 8, 1.0, 0.5, train=0.95)])])
    cell = tuning.cells(more).iloc[0]
    assert (cell["chosen_lr"], cell["did_not_train"]) == (0.1, 2)


def test_the_grid_and_the_chosen_runs_of_a_tuned_sweep():
    r = recipe("smoke")
    spec = SweepSpec("t", r, models=("plain", "fixup"), depths=(8, 20), seeds=(3, 4, 5), lr_grid=(0.01, 0.1))
    grid = spec.runs()
    assert [(s.model, s.seed, s.recipe.lr, s.lr_tuning) for s in grid[:4]] == [
        ("plain8", 3, 0.01, "grid"), ("plain8", 3, 0.1, "grid"), ("fixup8", 3, 0.01, "grid"), ("fixup8", 3, 0.1, "grid")]
    assert len(grid) == 8 and {s.lr_grid for s in grid} == {(0.01, 0.1)}
    runs = spec.runs({("fixup", 8): 0.1})
    assert [(s.model, s.seed, s.recipe.lr, s.lr_tuning) for s in runs[8:]] == [("fixup8", 4, 0.1, "chosen"),
                                                                              ("fixup8", 5, 0.1, "chosen")]
    # how an lr came about is recorded, not hashed: the chosen run is the run a sweep at --lr 0.1 trains
    assert runs[8].run_id == RunSpec("fixup8", recipe("smoke", lr=0.1), seed=4).run_id
    row = runs[8].flat()
    assert (row["lr_tuning"], row["lr_grid"], row["lr_chosen_by"]) == ("chosen", [0.01, 0.1], tuning_rule())
    assert grid[0].flat()["lr_chosen_by"] == "" and RunSpec("plain8", r).flat()["lr_tuning"] == ""
    # the preset grids: factors of 2, the recipe's lr among them
    assert LR_GRIDS["smoke"] == (0.003125, 0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2) and 0.1 in LR_GRIDS["he2015"]


def tuning_rule():
    from bench.specs import CHOSEN_BY

    return CHOSEN_BY


def test_per_kind_lrs_the_normalisation_and_the_methods_own_recipes_enter_the_run_id():
    base = RunSpec("fixup20", recipe("smoke"))
    for field, value in (("normalize", "standardize"), ("normalize", "pln"), ("mixup", 1.0), ("decay_1d", False),
                         ("lr", 0.1), ("weight_decay", 5e-4), ("momentum", 0.8), ("warmup_iters", 7)):
        other = RunSpec("fixup20", recipe("smoke", **{field: value}))
        assert other.run_id != base.run_id, field
        assert other.flat()[field] == value
    # at their defaults the new recipe fields leave the identity (and every earlier run_id) as it was
    assert not {"normalize", "mixup", "decay_1d"} & set(base.identity()["recipe"])
    assert base.run_id == "fixup20-cifar10-smoke-s0-" + base.run_id.rsplit("-", 1)[1]
    spec = SweepSpec("s", recipe("smoke"), models=("plain", "fixup", "tat"), depths=(20,),
                     lr_for=(("fixup", 0.1), ("tat", 0.005)))
    lrs = {s.model: s.recipe.lr for s in spec.runs()}
    assert (lrs["plain20"], lrs["fixup20"], lrs["tat20"]) == (0.05, 0.1, 0.005)
    paper = SweepSpec("s", recipe("smoke"), models=("resnet", "fixup", "dirac", "tat", "rezero"), depths=(20,),
                      method_recipe="paper")
    got = {s.model: (s.recipe.normalize, s.recipe.mixup, s.recipe.decay_1d, s.flat()["method_recipe"]) for s in paper.runs()}
    assert got == {"resnet20": ("pixel-mean", 0.0, True, "matched"), "fixup20": ("standardize", 1.0, True, "paper"),
                   "dirac20": ("pixel-mean", 0.0, False, "paper"), "tat20": ("pln", 0.0, True, "paper"),
                   "rezero20": ("pixel-mean", 0.0, True, "matched")}
    # a kind without a recipe of its own is the same run under either variant
    matched = {s.model: s.run_id for s in SweepSpec("s", recipe("smoke"), models=("resnet",), depths=(20,)).runs()}
    assert matched["resnet20"] == next(s.run_id for s in paper.runs() if s.model == "resnet20")


def test_sweep_settings_are_checked_and_kept_in_sweep_toml():
    r = recipe("smoke")
    two = dict(seeds=(0, 1))
    for kw, message in ((dict(lr_for=(("vgg", 0.1),)), "--lr-for names unknown kind"),
                        (dict(lr_grid=(0.1, 0.1), **two), "at least two learning rates"),
                        (dict(lr_grid=(0.1, -1.0), **two), "must be positive"),
                        (dict(lr_grid=(0.1, 0.2), lr_for=(("plain", 0.1),), **two), "give one of them"),
                        (dict(method_recipe="best"), "method_recipe must be one of matched, paper"),
                        (dict(lr_grid=(0.1, 0.2)), "reports only seeds that took no part in choosing the lr"),
                        (dict(lr_grid=(0.1, 0.2), seeds=(0, 1), grid_seeds=2), "--grid-seeds 2 of them"),
                        (dict(lr_grid_for=(("tat", (0.1, 0.2)),), **two), "give --lr-grid too"),
                        (dict(lr_grid=(0.1, 0.2), lr_grid_for=(("tat", (0.1,)),), **two), "--lr-grid-for tat: a grid"),
                        (dict(weight_decay_for=(("vgg", 0.1),)), "name unknown kind"),
                        (dict(weight_decay_for=(("tat", -1.0),)), "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            SweepSpec("s", r, **kw)
    with pytest.raises(ValueError, match="never on test error: --val-size 0"):
        SweepSpec("s", recipe("smoke", val_size=0), lr_grid=(0.1, 0.2), **two)
    with pytest.raises(ValueError, match="ImageNet-style data takes the paper's per-pixel mean"):
        RunSpec("resnet18", recipe("imagenette", normalize="standardize"), dataset="imagenette")
    spec = SweepSpec("s", r, lr_for=(("fixup", 0.1), ("tat", 0.005)), method_recipe="paper")
    text = spec.to_toml()
    assert tomllib.loads(text)["lr_for"] == {"fixup": 0.1, "tat": 0.005}
    assert SweepSpec.from_toml(text) == spec
    tuned = SweepSpec("s", r, lr_grid=(0.01, 0.1), seeds=(0, 1, 2), grid_seeds=2, lr_grid_for=(("tat", (0.001, 0.002)),),
                      weight_decay_for=(("tat", 0.0), ("fixup", 5e-4)))
    assert tomllib.loads(tuned.to_toml())["lr_grid_for"] == {"tat": [0.001, 0.002]}
    assert SweepSpec.from_toml(tuned.to_toml()) == tuned
    for other in (dict(lr_grid=(0.01, 0.2)), dict(grid_seeds=1), dict(lr_grid_for=()), dict(weight_decay_for=()),
                  dict(grid_widen=0)):
        with pytest.raises(ValueError, match="other settings"):  # another grid in the same folder: another experiment
            tuned.union(replace(tuned, **other))


SWEEP = ["sweep", "--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--iterations", "4", "--eval-every",
         "2", "--train-size", "64", "--val-size", "64", "--test-size", "32", "--batch-size", "32"]


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_a_tuned_sweep_trains_the_grid_then_the_chosen_lr_and_resumes_without_retraining(tmp_path, monkeypatch):
    from bench import sweep as sw

    args = SWEEP + ["--models", "plain,fixup", "--seeds", "0,1", "--lr-grid", "0.01,0.05,0.2", "--lr-grid-widen", "1",
                    "--out", str(tmp_path)]
    real, calls = sw.run_recorded, []

    def interrupted_at_the_fourth(group, *a, **k):  # Ctrl-C in the middle of the grid
        calls.append(group[0].run_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(group, *a, **k)

    monkeypatch.setattr(sw, "run_recorded", interrupted_at_the_fourth)
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 130 and "rerun the same command to resume" in first.output
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    assert len(stamps) == 3
    monkeypatch.setattr(sw, "run_recorded", real)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    # the rest of the grid first; then each cell's chosen lr, or the grid widened where the choice sat at an edge
    assert "3 already recorded, 4 to train" in second.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir() if p.name in stamps} == stamps
    runs, _ = records.load(tmp_path)
    grid = runs[runs["lr_tuning"] == "grid"]
    assert set(grid["seed"]) == {0} and set(grid["lr_grid"]) == {(0.01, 0.05, 0.2)} and set(grid["lr_grid_seeds"]) == {(0,)}
    chosen = runs[runs["lr_tuning"] == "chosen"]
    for kind in ("plain", "fixup"):
        mine = grid[grid["kind"] == kind].sort_values("lr")
        lrs = mine["lr"].tolist()
        # by hand: the sweep's grid, plus factor-2 steps beyond its ends (at most two a side)
        assert {0.01, 0.05, 0.2} <= set(lrs) and len(lrs) <= 5  # --lr-grid-widen 1: one step a side at most
        assert set(lrs) - {0.01, 0.05, 0.2} <= {0.005, 0.4}
        ok = mine[mine["status"] == "ok"]
        best = ok.sort_values(["late_val_err", "lr"]).iloc[0]["lr"]  # the lowest late validation error
        assert chosen.loc[chosen["kind"] == kind, ["seed", "lr"]].values.tolist() == [[1, best]]
        # a choice at the end of the grid only where it widened as far as allowed
        assert best not in (lrs[0], lrs[-1]) or len(lrs) - 3 >= 1 or (mine["status"] != "ok").any()
    assert "lr chosen per cell on validation error" in second.output
    third = CliRunner().invoke(main, args)
    assert f"{len(runs)} already recorded, 0 to train" in third.output
    assert (tmp_path / "sweep.toml").read_text().count("lr_grid = [0.01, 0.05, 0.2]") == 1


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_the_report_of_a_tuned_sweep_shows_each_net_at_its_chosen_lr_and_the_grid_apart(tmp_path):
    from bench.report import build_report

    args = SWEEP + ["--models", "plain,resnet", "--seeds", "0,1,2", "--lr-grid", "0.01,0.1", "--lr-grid-widen", "1",
                    "--out", str(tmp_path / "s")]
    assert CliRunner().invoke(main, args).exit_code == 0
    runs, _ = records.load(tmp_path / "s")
    rep = build_report(tmp_path / "s", tmp_path / "rep", responses=False)
    table = rep.tables["tuned"].set_index("net")
    for kind, net in (("plain", "plain-8"), ("resnet", "residual-8")):
        grid = runs[(runs["kind"] == kind) & (runs["lr_tuning"] == "grid")]
        best = grid[grid["status"] == "ok"].sort_values(["late_val_err", "lr"]).iloc[0]
        assert table.loc[net, "chosen lr"] == f"{best['lr']:g}"
        # a grid of two puts any first choice at an edge: the grid widened, and a choice still at its end is flagged
        assert len(grid) > 2 and table.loc[net, "lr grid"].endswith(f"widened by {len(grid) - 2})")
        assert table.loc[net, "edge"] == ("-" if best["lr"] not in (grid["lr"].min(), grid["lr"].max()) else
                                          "low edge" if best["lr"] == grid["lr"].min() else "high edge")
        assert table.loc[net, "val err % at chosen lr (grid seed 0)"] == f"{100 * best['late_val_err']:.1f}"
        at = runs[(runs["kind"] == kind) & (runs["lr"] == best["lr"]) & (runs["lr_tuning"] == "chosen")]
        assert sorted(at["seed"]) == [1, 2] and table.loc[net, "train / test err % on fresh seeds (n)"].endswith("(2)")
    # the degradation figure and the tables hold each net's chosen runs only: two fresh seeds, no grid seed
    assert "n = 2 seeds" in rep.figures["degradation"]._suptitle.get_text()
    assert "lr tuned per net and depth" in rep.figures["degradation"]._suptitle.get_text()
    assert "lr_grid" in rep.figures and rep.tables["final_errors"].iloc[0, 1].endswith("(2)")


def test_per_kind_grids_and_weight_decay_change_the_runs_and_their_run_ids(tmp_path):
    r = recipe("smoke")
    base = SweepSpec("s", r, models=("plain", "tat"), depths=(20,), seeds=(0, 1), lr_grid=(0.01, 0.1))
    own = replace(base, lr_grid_for=(("tat", (0.001, 0.002, 0.004)),), weight_decay_for=(("tat", 0.0),))
    before, after = ({(s.model, s.recipe.lr): s for s in spec.runs()} for spec in (base, own))
    assert sorted(lr for m, lr in after if m == "tat20") == [0.001, 0.002, 0.004]
    assert {s.lr_grid for (m, _), s in after.items() if m == "tat20"} == {(0.001, 0.002, 0.004)}
    assert all(s.recipe.weight_decay == 0.0 for (m, _), s in after.items() if m == "tat20")
    # plain keeps its runs (same run_ids); tat's decay enters the run_id even at an lr both grids hold
    assert {k: s.run_id for k, s in before.items() if k[0] == "plain20"} == \
        {k: s.run_id for k, s in after.items() if k[0] == "plain20"}
    assert RunSpec("tat20", replace(r, lr=0.01, weight_decay=0.0)).run_id != before[("tat20", 0.01)].run_id
    # the options and a --config file give the same sweep
    cfg = tmp_path / "c.toml"
    cfg.write_text('lr-grid-for = {tat = [0.001, 0.002, 0.004]}\nweight-decay-for = {tat = 0.0}\n')
    outs = []
    for extra in (["--lr-grid-for", "tat=0.001:0.002:0.004", "--weight-decay-for", "tat=0"], ["--config", str(cfg)]):
        out = tmp_path / f"o{len(outs)}"
        res = CliRunner().invoke(main, ["sweep", "--kinds", "plain,tat", "--depths", "20", "--seeds", "0,1",
                                        "--lr-grid", "0.01,0.1", "--executor", "slurm", "--dry-run", "--out", str(out)]
                                 + extra)
        assert res.exit_code == 0, res.output
        outs.append(sorted(line.split(": ", 1)[1] for line in res.output.splitlines() if line.strip().startswith("task")))
    assert outs[0] == outs[1] and sum("tat20" in t for t in outs[0]) == 3
    bad = CliRunner().invoke(main, ["sweep", "--lr-grid-for", "tat=fast", "--lr-grid", "0.1,0.2", "--seeds", "0,1"])
    assert bad.exit_code == 2 and "expected KIND=LR:LR:" in bad.output


def test_the_late_validation_error_is_the_mean_over_the_last_quarter_of_the_steps():
    from bench import outcome

    curves = pd.DataFrame(dict(iteration=[100, 200, 300, 400], val_err=[0.5, 0.4, 0.3, 0.2]))
    assert outcome.late(curves, "val_err") == pytest.approx(0.25)  # points 300 and 400: iteration >= 3/4 of 400
    gaps = curves.assign(val_err=[0.5, 0.4, float("nan"), 0.2])
    assert outcome.late(gaps, "val_err") == pytest.approx(0.2)
    assert math.isnan(outcome.late(curves.assign(val_err=float("nan")), "val_err"))
