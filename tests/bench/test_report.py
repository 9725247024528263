"""The report, drawn from a real small results folder made by actually running tiny runs."""
import re

import pandas as pd
import pytest
from click.testing import CliRunner

import resnet
from bench import records
from bench.cli import main
from bench.report import ReportError, build_report, comparison_table

# long enough that every run trains (final training errors 74-81 % here, well below the 88 % of "did not train")
TINY = ["--batch-size", "32", "--iterations", "40", "--eval-every", "20", "--lr", "0.1", "--train-size", "256",
        "--val-size", "128", "--test-size", "128", "--width", "0.25", "--device", "cpu"]


def _data_lines(ax):
    """The lines an axis draws from data: not the dotted chance line (an axhline, in axis coordinates)."""
    return [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1 and ln.get_linestyle() != ":"]


@pytest.fixture(scope="module")
def results(tmp_path_factory, cifar_root):
    out = tmp_path_factory.mktemp("sweep")
    res = CliRunner().invoke(main, ["sweep", "--kinds", "plain,resnet", "--depths", "8,14", "--seeds", "0,1",
                                    "--data-root", str(cifar_root), "--out", str(out), *TINY])
    assert res.exit_code == 0, res.output
    # Figure 7's measurement: diagnose reads the weights and the test images; the report reads its records only
    res = CliRunner().invoke(main, ["diagnose", str(out), "--data-root", str(cifar_root), "--no-lesion", "--no-shattered"])
    assert res.exit_code == 0, res.output
    return out


def test_report_draws_figure6_panels_lines_and_styles(results, cifar_root, tmp_path):
    rep = build_report(results, tmp_path / "rep")
    fig = rep.figures["training_curves"]
    axes = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in axes] == ["plain", "residual"]
    runs, curves = records.load(results)
    assert (runs["final_train_err"] < 0.88).all()  # every run trained: the lines are their means
    for ax in axes:
        lines = _data_lines(ax)
        assert len(lines) == 4  # 2 depths x (train, test)
        assert {ln.get_linestyle() for ln in lines} == {"-", "--"}  # test solid, train dashed
        assert sorted(set(map(float, lines[0].get_xdata()))) == [20.0, 40.0]
        # the mean over 2 seeds is drawn (a band of their sd around it)
        assert any(len(c.get_paths()) for c in ax.collections)
    ys = sorted(round(float(v), 6) for ln in _data_lines(axes[0]) for v in ln.get_ydata())
    plain = curves.merge(runs[["run_id", "kind", "depth"]], on="run_id").query("kind == 'plain'")
    expect = [100 * plain.groupby(["depth", "iteration"])[c].mean() for c in ("train_err", "test_err")]
    assert ys == sorted(round(float(v), 6) for e in expect for v in e)
    assert "n = 2 seeds" in fig._suptitle.get_text()


def test_report_degradation_throughput_and_files(results, cifar_root, tmp_path):
    rep = build_report(results, tmp_path / "rep", "svg")
    deg = [ax for ax in rep.figures["degradation"].axes if ax.get_title()]
    assert [ax.get_title() for ax in deg] == ["final training error", "final test error"]
    assert sorted(set(float(x) for ln in _data_lines(deg[0]) for x in ln.get_xdata())) == [8.0, 14.0]
    assert "CPU" in rep.figures["throughput"]._suptitle.get_text()
    names = {p.name for p in rep.files}
    assert {"training_curves.svg", "degradation.svg", "throughput.svg", "layer_responses.svg", "report.md", "report.html"} <= names
    page = (tmp_path / "rep" / "report.html").read_text()
    assert page.count("data:image/svg+xml;base64,") == len(rep.figures)
    # no Table 6 section for another recipe (nothing in it compares); the spec and the machine, folded away
    assert "Comparison with He et al. 2015, Table 6" not in page and "Sweep spec" in page and "torch_version" in page
    assert "<details><summary><h2 style='display:inline'>Hardware and software</h2>" in page


def test_comparison_table_numbers(results):
    runs, _ = records.load(results)
    table = comparison_table(runs).set_index("net")
    assert set(table.index) == {"plain-8", "plain-14", "resnet-8", "resnet-14"}
    errs = 100 * runs[runs["model"] == "resnet14"]["final_test_err"]
    mean, sd = errs.mean(), errs.std()
    half = 12.706204736 * sd / 2 ** 0.5  # the t-interval of 2 values: t(0.975, 1 df) x sd / sqrt(2)
    assert table.loc["resnet-14", "test err % (mean [95 % CI])"] == f"{mean:.2f} [{mean - half:.2f}, {mean + half:.2f}]"
    assert table.loc["resnet-14", "sd"] == round(sd, 2)
    assert table.loc["resnet-14", "n"] == 2
    assert table.loc["plain-8", "He et al. %"] == "figure only"
    assert table.loc["resnet-14", "He et al. %"] == "-"  # the paper has no ResNet-14


def test_comparison_against_table6_values():
    rows = pd.DataFrame([dict(status="ok", family="cifar", kind="resnet", depth=20, recipe="he2015", width=1.0,
                              dataset="cifar10", seed=s, final_test_err=e) for s, e in ((0, 0.08), (1, 0.09))])
    t = comparison_table(rows).iloc[0]
    assert t["He et al. %"] == "8.75" and t["difference"] == "-0.25" and t["n"] == 2
    rows["recipe"] = "quick"
    assert comparison_table(rows).iloc[0]["difference"] == "- (other recipe)"  # compares with nothing published


def test_figure7_responses_measured_by_diagnose_on_the_saved_weights(results, tmp_path, monkeypatch):
    monkeypatch.delenv("RESBENCH_DATA", raising=False)  # the report needs no data set
    rep = build_report(results, tmp_path / "r7")
    resp = rep.tables["responses"]
    n_layers = len(resnet.stats.response_layers(resnet.build("plain14")))
    assert n_layers == 13  # the stem conv and 12 block convs: every 3x3 layer of a 14-layer net
    per_run = resp.groupby("run_id")["layer"].max()
    runs, _ = records.load(results)
    assert per_run[runs.loc[runs["model"] == "plain14", "run_id"]].eq(13).all()
    assert (resp["std"] > 0).all()
    assert (results / "analysis" / "responses.parquet").exists()  # written by diagnose
    labels = [t.get_text() for t in rep.figures["layer_responses"].axes[1].get_legend().get_texts()]
    assert {"plain-8", "residual-14"} <= set(labels)


def test_missing_failed_and_single_run(results, tmp_path, cifar_root):
    # a sweep.toml asking for one seed more than was run: those runs show as missing
    text = (results / "sweep.toml").read_text()
    other = tmp_path / "partial"
    other.mkdir()
    (other / "sweep.toml").write_text(re.sub(r"seeds = \[.*\]", "seeds = [0, 1, 2]", text))
    from bench.specs import SweepSpec
    from bench.sweep import write_expected

    write_expected(SweepSpec.from_toml((other / "sweep.toml").read_text()).runs(), other)  # as its sweep writes it
    for sub in ("runs", "curves", "weights"):
        (other / sub).mkdir()
    runs, _ = records.load(results)
    one = runs[runs["model"] == "resnet8"].iloc[0]["run_id"]  # a single run
    for sub, ext in (("runs", "parquet"), ("curves", "parquet"), ("weights", "pt")):
        (other / sub / f"{one}.{ext}").write_bytes((results / sub / f"{one}.{ext}").read_bytes())
    rep = build_report(other)
    status = rep.tables["status"]
    assert (status["status"] == "missing").sum() == 11  # 12 runs asked for, 1 recorded
    assert "training_curves" in rep.figures and "degradation" in rep.figures


def test_empty_or_resultless_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ReportError, match="holds no results"):
        build_report(tmp_path)
    with pytest.raises(ReportError, match="is not a folder"):
        build_report(tmp_path / "absent")
    res = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert res.exit_code == 1 and "holds no results" in res.output and "resbench sweep" in res.output


def test_report_cli_writes_files(results, cifar_root, tmp_path):
    res = CliRunner().invoke(main, ["report", str(results), "--out", str(tmp_path / "c"), "--no-responses"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "report.html").exists() and (tmp_path / "c" / "training_curves.png").exists()
    assert not (tmp_path / "c" / "layer_responses.png").exists()


def test_degradation_and_throughput_draw_the_recorded_numbers(results, tmp_path):
    """Each point is the mean over seeds of the recorded value (in %), at its depth."""
    rep = build_report(results, tmp_path / "rep", responses=False)
    runs, _ = records.load(results)
    runs["net"] = runs["residual"].map({True: "residual", False: "plain"})
    deg = [ax for ax in rep.figures["degradation"].axes if ax.get_title()]
    assert [ax.get_title() for ax in deg] == ["final training error", "final test error"]
    for ax, col in zip(deg, ["final_train_err", "final_test_err"]):
        drawn = sorted((float(x), round(float(y), 6)) for ln in _data_lines(ax)
                       for x, y in zip(ln.get_xdata(), ln.get_ydata()))
        expect = sorted((float(d), round(100 * v, 6)) for (_, d), v in runs.groupby(["net", "depth"])[col].mean().items())
        assert drawn == expect, col
    ax = rep.figures["throughput"].axes[0]
    drawn = sorted(round(float(y), 3) for ln in ax.get_lines() if len(ln.get_xdata()) > 1 for y in ln.get_ydata())
    assert drawn == sorted(round(float(v), 3) for v in runs.groupby(["net", "depth"])["train_img_per_s"].mean())


def test_a_run_that_did_not_train_is_marked_in_tables_figures_and_titles_never_pooled(results, tmp_path):
    import shutil

    folder = tmp_path / "one-untrained"
    shutil.copytree(results, folder, ignore=shutil.ignore_patterns("report", "analysis"))
    runs, _ = records.load(folder)
    bad = runs[runs["model"] == "plain14"].iloc[0]
    row = pd.read_parquet(folder / "runs" / f"{bad['run_id']}.parquet").assign(final_train_err=0.95)
    records.write_parquet(row, folder / "runs" / f"{bad['run_id']}.parquet")  # planted: at chance after training
    rep = build_report(folder, tmp_path / "rep", responses=False)
    cell = rep.tables["final_errors"].set_index("net").loc["plain", "depth 14: train / test err % (n)"]
    other = runs[(runs["model"] == "plain14") & (runs["run_id"] != bad["run_id"])].iloc[0]
    # the mean is the run that trained, and the cell says what became of the other
    assert cell == (f"{100 * other['final_train_err']:.1f} / {100 * other['final_test_err']:.1f} "
                    f"(1 of 2 trained; 1 did not train)")
    status = rep.tables["status"]
    assert status.loc[status["run_id"] == bad["run_id"], "status"].tolist() == ["did not train"]
    deg = rep.figures["degradation"]
    title = deg._suptitle.get_text()
    assert "n = 1..2 seeds" in title and "1 run that did not train" in title
    train_ax = [ax for ax in deg.axes if ax.get_title() == "final training error"][0]
    marks = [tuple(map(float, c.get_offsets()[0])) for c in train_ax.collections if len(c.get_offsets()) == 1]
    assert (14.0, 95.0) in marks  # drawn apart, where it ended
    drawn = {(float(x), round(float(y), 6)) for ln in _data_lines(train_ax) for x, y in zip(ln.get_xdata(), ln.get_ydata())}
    assert (14.0, round(100 * other["final_train_err"], 6)) in drawn  # the plain line at 14 is the trained run alone
    curves = rep.figures["training_curves"]
    plain_ax = [ax for ax in curves.axes if ax.get_title() == "plain"][0]
    from matplotlib.colors import to_hex

    assert sum(to_hex(ln.get_color()) == to_hex("0.6") for ln in plain_ax.get_lines()) == 2  # its two curves, grey
    assert "1 run that did not train" in curves._suptitle.get_text()
    assert any(n.startswith("1 run(s) did not train") for n in rep.notes)  # counted; the status table names it
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "did not train" in md and "Grey x: a run that did not train" in md


def test_what_became_of_each_run_by_hand():
    from bench import outcome

    runs = pd.DataFrame(dict(status=["ok", "ok", "ok", "diverged", "failed", "ok"],
                             final_train_err=[0.8799, 0.88, 0.96, float("nan"), float("nan"), 0.9699],
                             final_test_err=[0.5, 0.9, 0.9, float("nan"), float("nan"), 0.9],
                             dataset=["cifar10", "cifar10", "cifar10", "cifar10", "cifar10", "cifar100"]))
    assert outcome.label(runs).tolist() == ["trained", "did not train", "did not train", "diverged", "failed", "trained"]
    assert outcome.chance_error("cifar100") == pytest.approx(0.99) and outcome.chance_error("mine") == pytest.approx(0.9)
    assert outcome.counts(runs.iloc[:1]) == ""
    assert outcome.counts(runs.iloc[:5]) == "1 of 5 trained; 2 did not train, 1 diverged, 1 failed"
    assert outcome.error_cell(runs.iloc[[0, 3]]) == "88.0 / 50.0 (1 of 2 trained; 1 diverged)"
    # 88 and 96: mean 92, sd 5.657, t(0.975, 1 df) 12.706: 92 -+ 50.8; two equal values: no spread
    assert outcome.error_cell(runs.iloc[[1, 2]]) == ("did not train: 92.0 [41.2, 142.8] / 90.0 [90.0, 90.0] "
                                                     "(0 of 2 trained; 2 did not train)")
    assert outcome.error_cell(runs.iloc[[3]]) == "0 of 1 trained; 1 diverged" and outcome.error_cell(runs.iloc[0:0]) == "-"


def test_throughput_shows_the_timed_windows_spread_ticks_the_depths_run_and_the_document_reads_numbers_first(
        results, tmp_path):
    from matplotlib.collections import LineCollection

    from bench.report import COMPARE, _seeds_note

    rep = build_report(results, tmp_path / "rep", responses=False)
    runs, curves = records.load(results)
    ax = rep.figures["throughput"].axes[0]
    assert [float(t) for t in ax.get_xticks()] == [8.0, 14.0]  # the depths run, not 10/20/30
    bars = sorted((float(x0), round(float(lo), 3), round(float(hi), 3)) for c in ax.collections
                  if isinstance(c, LineCollection) for (x0, lo), (_, hi) in c.get_segments())
    # by hand: per net and depth, the slowest and fastest window of its runs, each run's first window left out
    later = curves.merge(runs[["run_id", "depth", "residual"]], on="run_id").query("iteration > 20")
    want = sorted((float(d), round(float(g["img_per_s"].min()), 3), round(float(g["img_per_s"].max()), 3))
                  for (_, d), g in later.groupby(["residual", "depth"]))
    assert bars == want
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "nan" not in md.lower().replace("nanoseconds", "")
    assert md.index("## Final errors per net and depth") < md.index("![")  # tables of results before the figures
    # a compared value with fewer seeds is never hidden in another's count
    df = pd.DataFrame(dict(model=["a"] * 4, seed=[0, 1, 2, 0], **{COMPARE: ["0.5", "0.5", "0.5", "0.25"]}))
    assert _seeds_note(df, ["model"]) == "n = 1..3 seeds"
