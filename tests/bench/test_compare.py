"""Comparisons across sweeps and machines: `resbench report A B --compare-by COLUMN` and
`resbench profile --against`, on real tiny runs and profiles."""
import pandas as pd
import pytest

from click.testing import CliRunner

from bench import profile_tables
from bench.cli import main
from bench.report import ReportError, build_report

TINY = ["--dataset", "synthetic", "--models", "plain,resnet", "--depths", "8", "--width", "0.25", "--batch-size", "32",
        "--train-size", "128", "--val-size", "32", "--test-size", "32", "--iterations", "8", "--eval-every", "4",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmp")
    for name, extra in (("sa", ["--shortcut", "A"]), ("sb", ["--shortcut", "B"]), ("wb", ["--shortcut", "B", "--width", "0.5"])):
        res = CliRunner().invoke(main, ["sweep", *TINY, *extra, "--name", name, "--out", str(root / name)])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(main, ["diagnose", str(root / name), "--no-lesion", "--no-shattered"])  # Figure 7
        assert res.exit_code == 0, res.output
    return root


def _legend(fig) -> set[str]:
    return {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()} | \
           {t.get_text() for leg in fig.legends for t in leg.get_texts()}


def test_two_sweeps_differing_only_in_shortcut(sweeps, tmp_path):
    rep = build_report([sweeps / "sa", sweeps / "sb"], tmp_path / "r", compare_by="shortcut")
    assert rep.compared == "shortcut" and rep.warnings == []
    titles = [ax.get_title() for ax in rep.figures["training_curves"].axes if ax.get_title()]
    assert titles == ["A: plain", "A: residual", "B: plain", "B: residual"]
    for name in ("degradation", "throughput", "layer_responses"):
        assert {"A", "B"} <= _legend(rep.figures[name]), name
    table = rep.tables["comparison"].set_index("net")
    runs = pd.concat([pd.read_parquet(p) for p in (sweeps / "sa" / "runs").glob("*.parquet")])
    a8 = 100 * runs.loc[runs["model"] == "resnet8", "final_test_err"].iloc[0]
    assert table.loc["resnet-8", "test err % [A]"] == f"{a8:.2f}" and table.loc["resnet-8", "n [B]"] == 1
    md = (tmp_path / "r" / "report.md").read_text()
    assert "Compared by `shortcut`" in md and "Warning" not in md
    # the per-net tables get a row per compared value: runs that differ in it are never pooled
    errors = rep.tables["final_errors"]
    assert list(errors.columns[:2]) == ["shortcut", "net"] and len(errors) == 4
    b = pd.concat([pd.read_parquet(p) for p in (sweeps / "sb" / "runs").glob("*.parquet")])
    b8 = 100 * b.loc[b["model"] == "plain8", "final_train_err"].iloc[0]
    cell = errors.set_index(["shortcut", "net"]).loc[("B", "plain"), "depth 8: train / test err % (n)"]
    assert cell.startswith(f"{b8:.1f} / ") and cell.endswith("(1)")
    why = rep.tables["why"]
    assert sorted(zip(why["shortcut"], why["net"])) == [(v, n) for v in "AB" for n in ("plain-8", "residual-8")]


def test_default_comparison_is_by_sweep_and_names_what_else_differs(sweeps, tmp_path):
    rep = build_report([sweeps / "sa", sweeps / "sb"], tmp_path / "r")
    assert rep.compared == "sweep" and len(rep.warnings) == 1 and "also in shortcut" in rep.warnings[0]
    rep = build_report([sweeps / "sa", sweeps / "wb"], tmp_path / "r2", compare_by="shortcut", responses=False)
    assert "also in width" in rep.warnings[0]
    md = (tmp_path / "r2" / "report.md").read_text()
    assert md.index("**Warning:**") < md.index("![")  # said at the top, before any figure


def test_the_same_run_in_two_folders_is_used_once_and_said(sweeps, tmp_path):
    import shutil

    shutil.copytree(sweeps / "sa", tmp_path / "copy")
    rep = build_report([sweeps / "sa", tmp_path / "copy"], tmp_path / "r", compare_by="shortcut", responses=False)
    assert sum("the report uses the copy in" in n for n in rep.notes) == 2  # plain8 and resnet8
    assert rep.tables["comparison"]["n [A]"].tolist() == [1, 1]


def test_comparison_bad_input(sweeps, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="not a results folder"):
        build_report([sweeps / "sa", tmp_path / "empty"], tmp_path / "r")
    with pytest.raises(ReportError, match="--compare-by shotcut: no such run column; choose one of: .*shortcut"):
        build_report([sweeps / "sa", sweeps / "sb"], tmp_path / "r", compare_by="shotcut")
    res = CliRunner().invoke(main, ["report", str(sweeps / "sa"), str(sweeps / "sb")])
    assert res.exit_code == 2 and "several results folders need --out" in res.output
    res = CliRunner().invoke(main, ["report", str(sweeps / "sa"), str(sweeps / "sb"), "--out", str(tmp_path / "c"),
                                    "--compare-by", "nope"])
    assert res.exit_code == 1 and "no such run column" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["report", str(sweeps / "sa"), str(sweeps / "wb"), "--out", str(tmp_path / "c"),
                                    "--compare-by", "shortcut", "--no-responses"])
    assert res.exit_code == 0 and "warning: these runs differ in more than shortcut: also in width" in res.output


PROFILE = ["profile", "--device", "cpu", "--models", "resnet8", "--precisions", "fp32", "--formats", "nchw",
           "--modes", "train", "--repeats", "2", "--block-s", "0.01", "--warmup", "1", "--no-baseline"]


def test_profile_against_a_saved_profile(tmp_path):
    ref = CliRunner().invoke(main, PROFILE + ["--batch-sizes", "4", "--out", str(tmp_path / "ref"), "--name", "ref"])
    assert ref.exit_code == 0, ref.output
    ref_df = pd.read_parquet(tmp_path / "ref" / "profile" / "ref.parquet")
    res = CliRunner().invoke(main, PROFILE + ["--batch-sizes", "4,8", "--out", str(tmp_path / "new"), "--name", "new",
                                              "--against", str(tmp_path / "ref")])
    assert res.exit_code == 0, res.output
    got = pd.read_parquet(tmp_path / "new" / "profile-against" / "new.parquet")
    new_df = pd.read_parquet(tmp_path / "new" / "profile" / "new.parquet")
    assert got["batch_size"].tolist() == [4]  # batch 8 has no reference
    expect = new_df.loc[new_df["batch_size"] == 4, "img_per_s"].iloc[0] / ref_df["img_per_s"].iloc[0]
    assert got["ratio"].iloc[0] == pytest.approx(expect)
    assert "no match in" in res.output and "batch_size=8" in res.output
    assert (tmp_path / "new" / "profile-against" / "new.png").exists()


def test_profile_against_bad_input(tmp_path, sweeps):
    runs_parquet = next((sweeps / "sa" / "runs").glob("*.parquet"))
    (tmp_path / "junk.parquet").write_text("not parquet")
    for target, message in ((runs_parquet, "not a resbench profile (it lacks the columns"),
                            (tmp_path / "junk.parquet", "not a readable parquet file"),
                            (tmp_path / "nowhere", "no such file or folder"),
                            (sweeps / "sa", "holds no profile parquet")):
        res = CliRunner().invoke(main, PROFILE + ["--batch-sizes", "4", "--out", str(tmp_path / "o"),
                                                  "--against", str(target)])
        assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output, res.output
        assert not (tmp_path / "o" / "profile").exists()  # refused before anything was timed or written


def test_a_configuration_measured_twice_counts_with_its_median_everywhere():
    """The one rule for a profile's quoted number: a configuration timed several times (the committed H200
    grid timed each eager one twice in one call) counts with the median of its measurements, in the
    report's table and against a reference alike, and the pipeline rows stay out."""
    row = dict(model="resnet20", batch_size=128, precision="bf16", memory_format="channels_last", execution="eager",
               mode="train", group_size=1, pad_input=0, status="ok", gpu_name="H200", cpu="x", mfu=None,
               peak_memory_bytes=1.0)
    df = pd.DataFrame([row | dict(img_per_s=v) for v in (100.0, 300.0, 110.0)]
                      + [row | dict(mode="train-pipeline", img_per_s=5.0)])
    once = profile_tables.measurements(df)
    assert len(once) == 1 and once["img_per_s"].iloc[0] == 110.0
    assert profile_tables.profile_table(df)["img_per_s"].tolist() == [110]
    legacy = df.drop(columns=["group_size", "pad_input"])  # a profile of an earlier version
    matched, _ = profile_tables.against(df.iloc[:1], legacy)
    assert matched["ref_img_per_s"].tolist() == [110.0] and matched["ratio"].tolist() == [100.0 / 110.0]
