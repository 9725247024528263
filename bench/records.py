"""Records: the parquet schema, atomic writes, environment metadata and load(results_dir).

Layout of a results folder (each worker writes only its own files):

    sweep.toml                the spec that made it
    runs/<run_id>.parquet     one row per finished run (status ok | diverged | failed)
    curves/<run_id>.parquet   one row per evaluation point
    weights/<run_id>.pt       final weights (state_dict + spec)
    ckpt/<run_id>.pt          in-progress checkpoint, deleted when the run finishes
    layers/<run_id>.parquet   one row per evaluation point and weighted layer (weight, gradient norms)
    signals/<run_id>.parquet  one row per evaluation point and block (backward signal at its output)

Every file is written to a temporary name in the same folder and renamed into place
(``os.replace`` is atomic on POSIX), so a killed process never leaves a half-written table.
"""
from __future__ import annotations

import datetime as dt
import functools
import os
import pickle
import platform
import subprocess
from pathlib import Path

import pandas as pd
import torch

import bench

# columns of a curves row, in order
CURVE_COLUMNS = ["run_id", "iteration", "epoch", "lr", "train_loss", "train_err", "val_err", "test_err",
                 "train_time_s", "img_per_s"]


# columns of a layers row (one per run x evaluation point x weighted layer; bench.fuse.Members.layer_rows)
LAYER_COLUMNS = ["run_id", "iteration", "layer", "layer_name", "weight_norm", "grad_norm", "update_ratio", "grad_rms",
                 "grad_x_weight"]
# columns of a signals row (one per run x evaluation point x block; bench.fuse.Members.signal_rows)
SIGNAL_COLUMNS = ["run_id", "iteration", "block", "block_name", "signal_rms", "batches"]


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename tmp onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_parquet(df: pd.DataFrame, path: Path) -> None:
    # pandas' own metadata restores the frame; arrow's copy of the schema and per-column statistics would
    # make a one-row run file 47 KB instead of 12 (results/ is committed, and copied off GPU machines)
    def write(tmp):
        try:
            df.to_parquet(tmp, index=False, write_statistics=False, store_schema=False)
        except TypeError:  # a pyarrow older than 12 has no store_schema
            df.to_parquet(tmp, index=False)

    atomic_write(path, write)


def save_torch(obj, path: Path) -> None:
    """Save tensors and plain containers only (what ``load_torch`` accepts)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class UnreadableFile(Exception):
    """A checkpoint or weights file that is damaged, or that only a code-running load could read."""


# the lines of torch's weights-only failure message around the one that says what was wrong
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def load_torch(path: Path, map_location=None):
    """A checkpoint or weights file, read with ``weights_only=True``: tensors and plain containers only.

    A .pt file is a pickle; a full load would run whatever code a crafted file names (a results
    folder or checkpoint from someone else, say). This one never does. Raises UnreadableFile with
    what went wrong and what to do.
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps every failure of its weights-only unpickler in one long message; only a refused
        # GLOBAL (a class or function the pickle names) means code, anything else (a bad opcode) is damage
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        if any("global" in line.lower() for line in lines):
            raise UnreadableFile(f"{path} holds objects beyond tensors and plain containers (written by other "
                                 f"software, or crafted to run code): refused. Delete it and rerun its run to "
                                 f"regenerate it") from e
        detail = next((line for line in lines if not line.startswith(_TORCH_BOILERPLATE)), lines[0] if lines else "")
        raise UnreadableFile(f"{path} is damaged ({type(e).__name__}: {detail})") from e
    except FileNotFoundError:
        raise
    except Exception as e:  # a truncated zip, an empty file, a bad header: torch raises many types
        raise UnreadableFile(f"{path} is damaged ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e


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


@functools.cache
def _git() -> tuple[str | None, bool | None]:
    """(sha, dirty) of the checkout resbench runs from, or (None, None) outside git."""
    root = Path(bench.__file__).resolve().parent.parent
    if os.environ.get("RESBENCH_GIT_SHA"):  # a copy of the checkout without .git (e.g. a GPU machine)
        return os.environ["RESBENCH_GIT_SHA"], os.environ.get("RESBENCH_GIT_DIRTY", "0") == "1"
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode:
            return None, None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
        return sha.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None, None


# instruction sets whose presence changes what the CPU computes (bf16 kernels, their rounding) or how fast
CPU_ISA = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16",
           "asimd", "sve", "sve2", "bf16", "i8mm")


def cpu_info(path: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, str]:
    """(model name, the CPU_ISA flags it has, comma-separated) from Linux's cpuinfo; elsewhere what
    ``platform`` knows and no flags. Two machines of one architecture (x86_64) can train the same
    spec to different fp32 and bf16 numbers: the model and these flags tell them apart."""
    model, flags = None, set()
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip().lower()
                if key in ("model name", "hardware", "cpu model") and model is None:
                    model = value.strip()
                elif key in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), ",".join(f for f in CPU_ISA if f in flags)


_cpu = functools.cache(cpu_info)  # read once per process


def environment(device: str) -> dict:
    """Hardware and software of this process. Deliberately no hostname."""
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    sha, dirty = _git()
    return dict(
        device=device,
        gpu_name=torch.cuda.get_device_name(torch.device(device)) if cuda else None,
        cpu=_cpu()[0],
        cpu_isa=_cpu()[1],
        cpu_capability=torch.backends.cpu.get_cpu_capability(),  # the kernels torch dispatches to (e.g. AVX512)
        cpu_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        cuda_version=torch.version.cuda,
        cudnn_version=torch.backends.cudnn.version() if cuda else None,
        cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),  # which GPU a pinned worker had
        python_version=platform.python_version(),
        resbench_version=bench.__version__,
        git_sha=sha,
        git_dirty=dirty,
        utc_time=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _read_folder(folder: Path) -> pd.DataFrame:
    files = sorted(folder.glob("*.parquet")) if folder.is_dir() else []
    frames = [pd.read_parquet(f) for f in files]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load(results_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(runs, curves) of a results folder as DataFrames (empty frames where nothing is recorded)."""
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"results folder {root} does not exist")
    return _read_folder(root / "runs"), _read_folder(root / "curves")


DONE = ("ok", "diverged")  # a failed run is tried again when the sweep is rerun


def recorded(out: Path, run_id: str) -> dict | None:
    """The run's row, or None if it has none yet."""
    path = paths(out, run_id)["run"]
    return pd.read_parquet(path).iloc[0].to_dict() if path.exists() else None


def load_layers(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-layer rows (weight and gradient norms at evaluation points) of a results folder."""
    return _read_folder(Path(results_dir) / "layers")


def load_signals(results_dir: str | os.PathLike) -> pd.DataFrame:
    """The per-block rows (backward signals at evaluation points) of a results folder."""
    return _read_folder(Path(results_dir) / "signals")


def finished(out: Path) -> dict[str, str]:
    """run_id -> status of every recorded run in ``out``."""
    runs = _read_folder(Path(out) / "runs")
    return dict(zip(runs["run_id"], runs["status"])) if len(runs) else {}
