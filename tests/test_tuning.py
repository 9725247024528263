"""The methods compared fairly: per-kind settings, the methods' own recipes, and the tuned axis (an lr grid on
the first seed, the lr with the lowest validation error on the others), against hand-made records and real
tiny sweeps."""
import math
import tomllib

import pandas as pd
import pytest
from click.testing import CliRunner

from bench import records, tuning
from bench.cli import main
from bench.specs import LR_GRIDS, RunSpec, SweepSpec, recipe


def _grid_row(kind, depth, lr, val, test=0.5, status="ok", train=0.5, grid=(0.01, 0.1, 1.0)):
    return dict(kind=kind, depth=depth, lr=lr, final_val_err=val, final_test_err=test, status=status,
                final_train_err=train, lr_tuning="grid", lr_grid=",".join(map(str, grid)), dataset="cifar10")


def test_the_lr_is_chosen_on_validation_error_never_on_test_error():
    rows = pd.DataFrame([_grid_row("fixup", 20, 0.01, val=0.40, test=0.10),  # the best test error
                         _grid_row("fixup", 20, 0.1, val=0.30, test=0.60),  # the best validation error
                         _grid_row("fixup", 20, 1.0, val=0.35, test=0.20)])
    assert tuning.choose(rows) == 0.1
    assert tuning.chosen(rows) == {("fixup", 20): 0.1}
    cell = tuning.cells(rows).iloc[0]
    assert (cell["chosen_lr"], cell["edge"], cell["val_err"], cell["recorded"]) == (0.1, "", 0.30, 3)


def test_a_diverged_or_failed_grid_run_is_never_chosen_and_a_failed_one_holds_the_choice_back():
    diverged = pd.DataFrame([_grid_row("tat", 20, 0.01, val=0.50), _grid_row("tat", 20, 0.1, val=0.10, status="diverged"),
                             _grid_row("tat", 20, 1.0, val=float("nan"), status="diverged")])
    assert tuning.chosen(diverged) == {("tat", 20): 0.01}
    assert tuning.cells(diverged).iloc[0][["diverged", "edge"]].tolist() == [2, "low edge"]
    # a failed run is retried by the next sweep and might then win: no choice until it is recorded
    failed = diverged.assign(status=["ok", "failed", "ok"], final_val_err=[0.5, 0.1, 0.6])
    assert tuning.chosen(failed) == {} and math.isnan(tuning.cells(failed).iloc[0]["chosen_lr"])
    assert tuning.choose(failed[failed["status"] == "ok"]) == 0.01
    # nothing trained without diverging: nothing to choose
    assert tuning.chosen(diverged.assign(status="diverged")) == {}
    # ties go to the smaller lr
    assert tuning.choose(pd.DataFrame([_grid_row("x", 8, 1.0, 0.2), _grid_row("x", 8, 0.1, 0.2)])) == 0.1


@pytest.mark.parametrize("best,edge", [(0.01, "low edge"), (1.0, "high edge"), (0.1, "")])
def test_a_chosen_lr_at_an_edge_of_the_grid_is_flagged(best, edge):
    rows = pd.DataFrame([_grid_row("resnet", 8, lr, val=0.2 if lr == best else 0.4) for lr in (0.01, 0.1, 1.0)])
    assert tuning.cells(rows).iloc[0]["edge"] == edge


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
    assert (row["lr_tuning"], row["lr_grid"], row["lr_chosen_by"]) == ("chosen", "0.01,0.1", tuning_rule())
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
    for kw, message in ((dict(lr_for=(("vgg", 0.1),)), "--lr-for names unknown kind"),
                        (dict(lr_grid=(0.1, 0.1)), "at least two learning rates"),
                        (dict(lr_grid=(0.1, -1.0)), "must be positive"),
                        (dict(lr_grid=(0.1, 0.2), lr_for=(("plain", 0.1),)), "give one of them"),
                        (dict(method_recipe="best"), "method_recipe must be one of matched, paper")):
        with pytest.raises(ValueError, match=message):
            SweepSpec("s", r, **kw)
    with pytest.raises(ValueError, match="never on test error: --val-size 0"):
        SweepSpec("s", recipe("smoke", val_size=0), lr_grid=(0.1, 0.2))
    with pytest.raises(ValueError, match="ImageNet-style data takes the paper's per-pixel mean"):
        RunSpec("resnet18", recipe("imagenette", normalize="standardize"), dataset="imagenette")
    spec = SweepSpec("s", r, lr_for=(("fixup", 0.1), ("tat", 0.005)), method_recipe="paper")
    text = spec.to_toml()
    assert tomllib.loads(text)["lr_for"] == {"fixup": 0.1, "tat": 0.005}
    assert SweepSpec.from_toml(text) == spec
    tuned = SweepSpec("s", r, lr_grid=(0.01, 0.1))
    assert SweepSpec.from_toml(tuned.to_toml()) == tuned
    with pytest.raises(ValueError, match="lr_grid"):  # another grid in the same folder is another experiment
        tuned.union(SweepSpec("s", r, lr_grid=(0.01, 0.2)))


SWEEP = ["sweep", "--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--iterations", "4", "--eval-every",
         "2", "--train-size", "64", "--val-size", "64", "--test-size", "32", "--batch-size", "32"]


def test_a_tuned_sweep_trains_the_grid_then_the_chosen_lr_and_resumes_without_retraining(tmp_path, monkeypatch):
    from bench import sweep as sw

    args = SWEEP + ["--models", "plain,fixup", "--seeds", "0,1", "--lr-grid", "0.01,0.05,0.2", "--out", str(tmp_path)]
    real, calls = sw.run_recorded, []

    def interrupted_at_the_fourth(group, *a, **k):  # Ctrl-C in the middle of the grid
        calls.append(group[0].run_id)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(group, *a, **k)

    monkeypatch.setattr(sw, "run_recorded", interrupted_at_the_fourth)
    first = CliRunner().invoke(main, args)
    assert first.exit_code != 0 and "Aborted" in first.output
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir()}
    assert len(stamps) == 3
    monkeypatch.setattr(sw, "run_recorded", real)
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    # the rest of the grid, and the chosen lr of the cell whose grid was complete; then the other chosen lr
    assert "3 already recorded, 4 to train" in second.output and "7 already recorded, 1 to train" in second.output
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").iterdir() if p.name in stamps} == stamps
    runs, _ = records.load(tmp_path)
    grid = runs[runs["lr_tuning"] == "grid"]
    assert len(grid) == 6 and set(grid["seed"]) == {0} and (grid["lr_grid"] == "0.01,0.05,0.2").all()
    chosen = runs[runs["lr_tuning"] == "chosen"]
    for kind in ("plain", "fixup"):
        mine = grid[grid["kind"] == kind]
        best = mine.sort_values(["final_val_err", "lr"]).iloc[0]["lr"]  # by hand: the lowest validation error
        assert chosen.loc[chosen["kind"] == kind, ["seed", "lr"]].values.tolist() == [[1, best]]
    assert "lr chosen per cell on validation error" in second.output
    third = CliRunner().invoke(main, args)
    assert "8 already recorded, 0 to train" in third.output
    assert (tmp_path / "sweep.toml").read_text().count("lr_grid = [0.01, 0.05, 0.2]") == 1


def test_the_report_of_a_tuned_sweep_shows_each_net_at_its_chosen_lr_and_the_grid_apart(tmp_path):
    from bench.report import build_report

    args = SWEEP + ["--models", "plain,resnet", "--seeds", "0,1", "--lr-grid", "0.01,0.1", "--out", str(tmp_path / "s")]
    assert CliRunner().invoke(main, args).exit_code == 0
    runs, _ = records.load(tmp_path / "s")
    rep = build_report(tmp_path / "s", tmp_path / "rep", responses=False)
    table = rep.tables["tuned"].set_index("net")
    for kind, net in (("plain", "plain-8"), ("resnet", "residual-8")):
        grid = runs[(runs["kind"] == kind) & (runs["lr_tuning"] == "grid")]
        best = grid.sort_values(["final_val_err", "lr"]).iloc[0]
        assert table.loc[net, "chosen lr"] == f"{best['lr']:g}"
        assert table.loc[net, "edge"] in ("low edge", "high edge")  # a grid of two: any choice is an edge
        at = runs[(runs["kind"] == kind) & (runs["lr"] == best["lr"])]
        assert len(at) == 2 and table.loc[net, "train / test err % at chosen lr (n)"].endswith("(2)")
    # the degradation figure and the tables hold each net at its chosen lr only: two seeds, not the grid's runs
    assert "n = 2 seeds" in rep.figures["degradation"]._suptitle.get_text()
    assert "lr tuned per net and depth" in rep.figures["degradation"]._suptitle.get_text()
    assert "lr_grid" in rep.figures and rep.tables["final_errors"].iloc[0, 1].endswith("(2)")
