"""Records: atomic writes, the tables of a results folder (declared in bench.schema) and load(results_dir).

Layout of a results folder (each worker writes only its own files):

    sweep.toml                the spec that made it
    runs/<run_id>.parquet     one row per finished run (status ok | diverged | failed)
    curves/<run_id>.parquet   one row per evaluation point
    weights/<run_id>.pt       final weights (state_dict + spec; bench.checkpoints)
    ckpt/<run_id>.pt          in-progress checkpoint, deleted when the run finishes
    layers/<run_id>.parquet   one row per evaluation point and weighted layer (weight, gradient norms)
    signals/<run_id>.parquet  one row per evaluation point and block (backward signal at its output)

`resbench pack` puts a table's finished runs into one file, ``<table>/packed.parquet`` (``pack``); readers
take packed and per-run files alike, a per-run file winning over a packed row of the same run (a run
recorded again after packing). Every file is written to a temporary name in the same folder and renamed
into place (``os.replace`` is atomic on POSIX), so a killed process never leaves a half-written table.

Reads and writes no torch (the reader side imports this module).
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq

from bench import schema

# columns of a curves, layers (bench.fuse.Members.layer_rows) and signals row, in order (bench.schema declares them)
CURVE_COLUMNS = [name for name, _, _ in schema.CURVES]
LAYER_COLUMNS = [name for name, _, _ in schema.LAYERS]
SIGNAL_COLUMNS = [name for name, _, _ in schema.SIGNALS]
PACKED = "packed.parquet"  # a table's packed file, beside its per-run files


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_table(df: pd.DataFrame, table: str, path: Path) -> None:
    """``df`` as ``table``'s declared schema (bench.schema.conform: a column it does not declare is an error),
    written atomically. Without per-column statistics (a one-row run file stays small: results/ is committed
    and copied off GPU machines)."""
    data = schema.conform(df, table)
    atomic_write(path, lambda tmp: pq.write_table(data, tmp, write_statistics=False))


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    """A frame that is no record table (a profile's comparison with another), as pandas writes it."""
    atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False, write_statistics=False))


def read_table(path: Path, table: str) -> pa.Table:
    """One file of ``table``, of any version, in the current schema (bench.schema.upgrade)."""
    return schema.upgrade(pq.read_table(path), table)


def read(path: Path, table: str) -> pd.DataFrame:
    """One file of ``table`` as a frame in the current schema."""
    return schema.lists_as_tuples(read_table(path, table).to_pandas())


def table(folder: Path, name: str | None = None) -> pd.DataFrame:
    """Every row of a table folder (runs/, curves/, ...): its packed file and its per-run files, each in the
    current schema; a run in both is taken from its own file. An empty frame with the table's columns where
    nothing is recorded."""
    folder = Path(folder)
    name = name or folder.name
    files = sorted(f for f in folder.glob("*.parquet") if f.name != PACKED) if folder.is_dir() else []
    parts = [read_table(f, name) for f in files]
    if (folder / PACKED).exists():
        packed = read_table(folder / PACKED, name)
        own = {str(i) for part in parts for i in set(part.column("run_id").to_pylist())}
        if own:
            packed = packed.filter(pa.compute.invert(pa.compute.is_in(packed.column("run_id"), pa.array(sorted(own)))))
        parts.insert(0, packed)
    parts = [p for p in parts if p.num_rows]
    data = pa.concat_tables(parts) if parts else schema.schema(name).empty_table()
    return schema.lists_as_tuples(data.to_pandas())


def paths(out: Path, run_id: str) -> dict[str, Path]:
    out = Path(out)
    return {
        "run": out / "runs" / f"{run_id}.parquet",
        "curves": out / "curves" / f"{run_id}.parquet",
        "weights": out / "weights" / f"{run_id}.pt",
        "layers": out / "layers" / f"{run_id}.parquet",
        "signals": out / "signals" / f"{run_id}.parquet",
        "ckpt": out / "ckpt" / f"{run_id}.pt",
        "errors": out / "errors",  # <run_id>.rank<r>.err: each process's traceback when the run raised there
    }


def load(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) of a results folder as DataFrames (empty frames where nothing is recorded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    return table(root / "runs"), table(root / "curves")


DONE = ("ok", "diverged")  # a failed run is tried again when the sweep is rerun


def recorded(out: Path, run_id: str) -> dict | None:
    """The run's row (its own file, else its packed row), or None if it has none yet."""
    path, packed = paths(out, run_id)["run"], Path(out) / "runs" / PACKED
    if path.exists():
        rows = read_table(path, "runs")
    elif packed.exists():
        rows = read_table(packed, "runs")
        rows = rows.filter(pa.compute.equal(rows.column("run_id"), run_id))
    else:
        return None
    return schema.lists_as_tuples(rows.to_pandas()).iloc[0].to_dict() if rows.num_rows else None


def load_layers(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-layer rows (weight and gradient norms at evaluation points) of a results folder."""
    return table(Path(results_dir) / "layers")


def load_signals(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-block rows (backward signals at evaluation points) of a results folder."""
    return table(Path(results_dir) / "signals")


def finished(out: Path) -> dict[str, str]:
    """run_id -> status of every recorded run in ``out``."""
    runs = table(Path(out) / "runs")
    return dict(zip(runs["run_id"], runs["status"]))


def pack(out: Path, keep: bool = False) -> dict[str, int]:
    """Each per-run table of ``out`` (runs, curves, layers, signals) as one file, ``<table>/packed.parquet``:
    the rows of every finished run (ok or diverged; a failed run keeps its own file, since the next sweep
    retries it), in the current schema. The per-run files packed are removed unless ``keep`` (other tools
    would then read those runs twice; resbench's readers take each once). Atomic and resumable: each packed
    file is written whole and renamed into place before any per-run file goes, and packing again merges what
    was recorded since. Returns the rows packed per table."""
    out = Path(out)
    runs = table(out / "runs")
    done = set(runs.loc[runs["status"].isin(DONE), "run_id"])
    counts = {}
    for name in schema.PER_RUN:
        folder = out / name
        files = [f for f in folder.glob("*.parquet") if f.name != PACKED and f.stem in done] if folder.is_dir() else []
        if not files and not (folder / PACKED).exists():
            continue
        rows = table(folder, name)
        rows = rows[rows["run_id"].isin(done)]
        write_table(rows, name, folder / PACKED)
        if not keep:
            for f in files:
                f.unlink()
        counts[name] = len(rows)
    counts.update(_rewrite_old(out))
    return counts


def _rewrite_old(out: Path) -> dict[str, int]:
    """diagnose's tables (analysis/), profile rows (profile/) and the per-run files left unpacked, of earlier
    versions, rewritten in the current schema: then every table of the folder opens alike in any reader."""
    done = {}
    files = [(f, f.stem) for f in sorted((out / "analysis").glob("*.parquet")) if f.stem in schema.TABLES]
    files += [(f, "profile") for f in sorted((out / "profile").glob("*.parquet"))]
    # the per-run files left unpacked (a failed run's, retried by the next sweep)
    files += [(f, name) for name in schema.PER_RUN for f in sorted((out / name).glob("*.parquet")) if f.name != PACKED]
    for path, name in files:
        if not pq.read_schema(path).equals(schema.schema(name), check_metadata=False):
            data = read_table(path, name)
            atomic_write(path, lambda tmp, d=data: pq.write_table(d, tmp, write_statistics=False))
            done[f"{path.parent.name}/{path.name}"] = data.num_rows
    return done


def start_attempt(out: Path, run_id: str) -> None:
    """A new attempt at a run that is not done: the earlier attempt's tracebacks (errors/<run_id>.rank*.err) and
    failed row go, so this attempt's record can only name this attempt's failure; the earlier error is kept in
    errors/<run_id>.previous (status shows it while the run is retried)."""
    p = paths(out, run_id)
    row = recorded(out, run_id)
    if row is not None and row["status"] == "failed":
        text = str(row["error"])
        atomic_write(p["errors"] / f"{run_id}.previous", lambda tmp: tmp.write_text(text))
        p["run"].unlink(missing_ok=True)
    for f in p["errors"].glob(f"{run_id}.rank*.err") if p["errors"].is_dir() else ():
        f.unlink(missing_ok=True)


def previous_error(out: Path, run_id: str) -> str | None:
    """The error of a run's last failed attempt while it is retried (``start_attempt``), else None."""
    f = paths(out, run_id)["errors"] / f"{run_id}.previous"
    return f.read_text() if f.exists() else None
