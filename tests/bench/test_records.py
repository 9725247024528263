"""Records any parquet reader opens (bench.schema, bench.records): every table in its declared schema, every
committed results folder readable by pandas, pyarrow.dataset, DuckDB and polars, files of earlier versions
upgraded, and packed folders read as unpacked ones."""
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from bench import records, schema
from bench.cli import main

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted(p for p in (ROOT / "results").glob("reference-*") if p.is_dir())


def results_folders(root: Path) -> list[Path]:
    """Every folder under ``root`` holding a runs/ table or a profile/."""
    return sorted({p.parent for p in root.rglob("*") if p.is_dir() and p.name in ("runs", "profile")})


def opens_everywhere(folder: Path) -> dict[str, int]:
    """Each table folder of ``folder`` read by pandas, pyarrow.dataset, DuckDB and polars, as they read any
    parquet folder, giving the same rows as resbench's own reader; every file in exactly its declared schema.
    Returns the rows per table."""
    import duckdb
    import polars as pl

    rows = {}
    for name in [*schema.PER_RUN, "profile"]:
        sub = folder / name
        files = sorted(sub.glob("*.parquet")) if sub.is_dir() else []
        if not files:
            continue
        table = "profile" if name == "profile" else name
        for f in files:
            got = pq.read_schema(f)
            assert got.equals(schema.schema(table), check_metadata=False), (f, set(got.names) ^ set(schema.schema(table).names))
        n = len(pd.read_parquet(sub))
        assert ds.dataset(sub, format="parquet").to_table().num_rows == n
        assert duckdb.sql(f"select count(*) from read_parquet('{sub}/*.parquet')").fetchall()[0][0] == n
        assert pl.read_parquet(f"{sub}/*.parquet").height == n
        if name != "profile":  # unpacked or packed with the per-run files removed: every run once
            assert n == len(records.table(sub)), sub
        rows[name] = n
    for f in sorted((folder / "analysis").glob("*.parquet")) if (folder / "analysis").is_dir() else []:
        if f.stem in schema.TABLES:
            assert pq.read_schema(f).equals(schema.schema(f.stem), check_metadata=False), f
            assert duckdb.sql(f"select count(*) from read_parquet('{f}')").fetchall()[0][0] == len(pd.read_parquet(f))
    return rows


@pytest.mark.parametrize("folder", [f for d in RESULTS for f in results_folders(d)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_committed_results_folder_opens_in_the_usual_tools_in_its_declared_schema(folder):
    assert opens_everywhere(folder)


SWEEP = ["sweep", "--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--iterations", "4", "--eval-every",
         "2", "--train-size", "64", "--val-size", "32", "--test-size", "32", "--batch-size", "32"]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A folder with an ok run (resnet8), a diverged one (plain8, the first trained: its first loss read as
    infinite) and a failed one (tat8: TAT cannot reach its target at depth 8)."""
    from bench.steps import TrainStep

    out = tmp_path_factory.mktemp("mixed")
    real, calls = TrainStep.read_members, []

    def first_infinite(self):
        losses, errs, seen = real(self)
        calls.append(1)
        return ([float("inf")] if len(calls) == 1 else losses), errs, seen

    with pytest.MonkeyPatch.context() as m:
        m.setattr(TrainStep, "read_members", first_infinite)
        res = CliRunner().invoke(main, SWEEP + ["--kinds", "plain,resnet,tat", "--out", str(out)])
    assert res.exit_code != 0 and "1 run(s) failed" in res.output, res.output  # the failed run is said, and exits 1
    return out


def test_ok_diverged_and_failed_runs_share_one_schema_and_each_says_what_it_is(mixed):
    assert opens_everywhere(mixed)["runs"] == 3
    runs = pd.read_parquet(mixed / "runs").set_index("model")
    assert runs["status"].to_dict() == {"resnet8": "ok", "plain8": "diverged", "tat8": "failed"}
    # the columns a reader needs are filled in every kind of row; the errors where there is one
    for col in ("run_id", "kind", "net_label", "depth", "seed", "recipe", "lr", "schema_version", "torch_version"):
        assert runs[col].notna().all(), col
    assert runs.loc["resnet8", "final_test_err"] >= 0 and pd.isna(runs.loc["resnet8", "error"])
    assert "non-finite" in runs.loc["plain8", "error"] and "tat" in runs.loc["tat8", "error"].lower()
    assert (runs["schema_version"] == schema.VERSION).all()
    assert runs.loc["resnet8", "net_label"] == "residual" and runs.loc["plain8", "net_label"] == "plain"
    assert bool(runs.loc["resnet8", "groupable"]) and not bool(runs.loc["tat8", "has_bn"])


def test_a_writer_may_not_add_an_undeclared_column_nor_a_value_of_another_type(tmp_path):
    with pytest.raises(schema.SchemaError, match="runs: column.s. speed not declared in bench/schema.py"):
        records.write_table(pd.DataFrame([dict(run_id="r", speed=1.0)]), "runs", tmp_path / "r.parquet")
    with pytest.raises(schema.SchemaError, match="runs.depth: values do not fit the declared type int64"):
        records.write_table(pd.DataFrame([dict(run_id="r", depth="deep")]), "runs", tmp_path / "r.parquet")
    assert not (tmp_path / "r.parquet").exists()


def test_files_of_earlier_versions_are_read_into_the_current_schema(tmp_path):
    # as version 1 wrote them: pandas' own types, a column missing, error null-typed here and text there,
    # lr_grid as text, no traits
    old = dict(run_id="a", model="resnet20", kind="resnet", residual=True, normalization="bn", depth=20, seed=0,
               status="ok", lr_tuning="grid", lr_grid="0.01,0.1", error=None, final_test_err=0.5)
    (tmp_path / "runs").mkdir()
    pd.DataFrame([old]).to_parquet(tmp_path / "runs" / "a.parquet")
    pd.DataFrame([old | dict(run_id="b", model="fixup20", kind="fixup", normalization="none", status="failed",
                             error="RuntimeError: x", lr_grid="")]).drop(columns="final_test_err").to_parquet(
        tmp_path / "runs" / "b.parquet")
    with pytest.raises(pa.ArrowException):  # what a user met before: one folder, two types of one column
        ds.dataset(tmp_path / "runs", format="parquet").to_table()
    runs = records.table(tmp_path / "runs").set_index("run_id")
    assert runs.loc["a", "lr_grid"] == (0.01, 0.1) and runs.loc["b", "lr_grid"] == ()
    assert pd.isna(runs.loc["a", "error"]) and runs.loc["b", "error"] == "RuntimeError: x"
    assert pd.isna(runs.loc["b", "final_test_err"]) and (runs["schema_version"] == 1).all()
    assert runs["net_label"].to_dict() == {"a": "residual", "b": "fixup"}
    assert runs["has_bn"].tolist() == [True, False] and runs["baseline"].tolist() == [True, False]
    # packing writes them in the current schema: every tool then opens the folder
    records.pack(tmp_path)
    assert opens_everywhere(tmp_path)["runs"] == 2


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_a_packed_folder_reads_as_the_unpacked_one_and_packing_again_takes_what_came_since(mixed, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(mixed, folder)
    before = [records.load(folder)[i].sort_values(["run_id"] + (["iteration"] if i else [])).reset_index(drop=True)
              for i in (0, 1)]
    res = CliRunner().invoke(main, ["pack", str(folder)])
    assert res.exit_code == 0 and "runs: 2 rows" in res.output, res.output  # the failed run keeps its own file
    assert sorted(p.name for p in (folder / "runs").iterdir()) == ["packed.parquet", next(
        p.name for p in (mixed / "runs").iterdir() if p.name.startswith("tat8"))]
    after = [records.load(folder)[i].sort_values(["run_id"] + (["iteration"] if i else [])).reset_index(drop=True)
             for i in (0, 1)]
    for a, b in zip(before, after):
        pd.testing.assert_frame_equal(a, b)
    assert opens_everywhere(folder)["runs"] == 3
    # the same report from either
    from bench.report import build_report

    build_report(mixed, tmp_path / "rep-a", responses=False)
    build_report(folder, tmp_path / "rep-b", responses=False)
    body = [(tmp_path / r / "report.md").read_text().split("\n", 1) for r in ("rep-a", "rep-b")]
    assert body[0][1] == body[1][1] and body[0][0] != body[1][0]  # all but the title, which names the folder
    # a run recorded after packing (a new seed) is packed by the next pack; a sweep finds its runs packed
    res = CliRunner().invoke(main, SWEEP + ["--kinds", "resnet", "--seeds", "0,1", "--out", str(folder)])
    assert "1 already recorded, 1 to train" in res.output, res.output
    CliRunner().invoke(main, ["pack", str(folder), "--keep"])
    assert len(records.table(folder / "runs")) == 4 and len(list((folder / "runs").glob("resnet8*"))) == 1
    assert records.recorded(folder, records.table(folder / "runs").query("model == 'resnet8'")["run_id"].iloc[0])


def test_an_interrupted_pack_leaves_every_run_readable_once(mixed, tmp_path, monkeypatch):
    folder = tmp_path / "f"
    shutil.copytree(mixed, folder)
    real = Path.unlink

    def killed(self, *a, **k):  # the packed file is in place, the per-run files not yet removed
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "unlink", killed)
    with pytest.raises(KeyboardInterrupt):
        records.pack(folder)
    monkeypatch.setattr(Path, "unlink", real)
    assert (folder / "runs" / "packed.parquet").exists() and len(records.table(folder / "runs")) == 3
    records.pack(folder)
    assert len(records.table(folder / "runs")) == 3 and len(list((folder / "runs").iterdir())) == 2


def test_the_readme_lists_every_run_column_with_the_schemas_words():
    text = (ROOT / "README.md").read_text()
    assert schema.markdown("runs") in text and schema.markdown("curves") in text


def test_a_new_attempt_clears_the_last_ones_failure_and_status_says_it_retries(tmp_path):
    from bench import claims
    from bench.sweep import status

    rid = "resnet8-synthetic-smoke-s0-0123456789"
    records.write_table(pd.DataFrame([dict(run_id=rid, model="resnet8", seed=0, status="failed",
                                           error="RuntimeError: rank 1 of 2 failed first: bad.JPEG")]), "runs",
                        records.paths(tmp_path, rid)["run"])
    errors = records.paths(tmp_path, rid)["errors"]
    errors.mkdir()
    for r in (0, 1):
        (errors / f"{rid}.rank{r}.err").write_text("Traceback ... bad.JPEG")
    claim = claims.Claim(tmp_path, rid)
    claim.acquire()  # this attempt's trainer
    records.start_attempt(tmp_path, rid)
    assert records.recorded(tmp_path, rid) is None and not list(errors.glob("*.rank*.err"))
    assert records.previous_error(tmp_path, rid) == "RuntimeError: rank 1 of 2 failed first: bad.JPEG"
    row = status(tmp_path).set_index("run_id").loc[rid]
    assert row["status"] == "retrying" and row["error"] == "last attempt: RuntimeError: rank 1 of 2 failed first: bad.JPEG"
    claim.release()
    # a run already done is left alone
    records.write_table(pd.DataFrame([dict(run_id=rid, status="ok")]), "runs", records.paths(tmp_path, rid)["run"])
    records.start_attempt(tmp_path, rid)
    assert records.recorded(tmp_path, rid)["status"] == "ok"
