"""The scripts a lent GPU machine runs (.ci/gpu-check, .ci/gpu-reference): GPU time is scarce, so what can
go wrong without a GPU is tried here, on the CPU, before a session spends it."""
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_scripts_parse():
    for script in ("gpu-check", "gpu-reference"):
        res = subprocess.run(["bash", "-n", str(ROOT / ".ci" / script)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_gpu_reference_trains_a_group_detached_diagnoses_it_and_collects_its_records(tmp_path):
    # the script calls python3 from PATH: put this interpreter's (a virtual environment's) first
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = os.environ | dict(PATH=path, REF=str(tmp_path / "ref"), OUT=str(tmp_path / "out"), PRESET="smoke", DEVICE="cpu",
                            SEEDS="0,1", RESBENCH_CACHE=str(tmp_path / "cache"),
                            EXTRA="--dataset synthetic --iterations 4 --eval-every 2 --train-size 64 --val-size 32 "
                                  "--test-size 32 --width 0.25")

    def script(*args):
        return subprocess.run(["bash", str(ROOT / ".ci" / "gpu-reference"), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=120)

    start = script("start", "8")
    assert start.returncode == 0 and "started pid" in start.stdout, start.stdout + start.stderr
    deadline = time.time() + 240
    while time.time() < deadline and "done" not in (tmp_path / "ref.log").read_text():
        time.sleep(0.5)
    log = (tmp_path / "ref.log").read_text()
    assert "sweep exit 0" in log and "diagnose exit 0" in log, log
    status = script("status")
    assert "not running" in status.stdout and "ok: 4" in status.stdout, status.stdout
    collected = script("collect")
    assert collected.returncode == 0, collected.stderr
    with tarfile.open(tmp_path / "out" / "ref-records.tar.gz") as tar:
        names = tar.getnames()
    assert {"sweep.toml", "runs", "curves", "layers", "analysis/lesion.parquet"} <= set(names)
    assert not any(n.startswith(("weights", "ckpt", "claims")) for n in names)
    assert script("bogus").returncode == 2 and script("start").returncode != 0
