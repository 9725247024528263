"""Shared fixtures: the real CIFAR-10 archive, a per-session data cache, a tiny recipe."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # decoded data sets go to a per-session cache: tests never touch ~/.cache
    os.environ["RESBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """Where the real CIFAR-10 python archive lies: $RESBENCH_DATA, else ../shared/data."""
    root = Path(os.environ.get("RESBENCH_DATA") or SHARED)
    if not (root / "cifar-10-python.tar.gz").exists() and not (root / "cifar-10-batches-py").exists():
        pytest.skip(f"real CIFAR-10 not found under {root} (set RESBENCH_DATA)")
    return root


@pytest.fixture
def tiny():
    """A recipe small enough for a few seconds on 2 CPU cores."""
    from bench.specs import recipe

    return recipe("smoke", batch_size=32, iterations=16, eval_every=8, train_size=256, val_size=256, test_size=256)
