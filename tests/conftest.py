"""Shared fixtures: the real CIFAR-10 archive, a per-session data cache, a tiny recipe."""
import os
from pathlib import Path

# a sweep's default on the CPU trains a run per core in worker processes (bench.launch.cpu_jobs); the tests train in
# their own process (they watch, interrupt and patch the trainer there), unless a test asks for workers
os.environ.setdefault("RESBENCH_JOBS", "1")

import pytest

ROOT = Path(__file__).resolve().parent.parent
# ../shared/data beside the checkout; mutmut runs the tests from a copy one folder deeper (mutants/)
SHARED = next((p / "shared" / "data" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared" / "data").is_dir()),
              ROOT.parent / "shared" / "data")


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    # decoded data sets go to a per-session cache: tests never touch ~/.cache. Mutation runs start a
    # session per mutant and keep one cache (RESBENCH_TEST_CACHE) so CIFAR-10 is decoded once.
    os.environ["RESBENCH_CACHE"] = os.environ.get("RESBENCH_TEST_CACHE") or str(tmp_path_factory.mktemp("cache"))
    yield


SKIPPED_REAL_DATA: list[str] = []  # why the real-data tests were skipped, said once at the end of the session


def _real_cifar() -> tuple[Path | None, str]:
    """(where the real CIFAR-10 is, as a --data-root: a folder or the archive itself; or None, and why)."""
    given = os.environ.get("RESBENCH_DATA")
    root = Path(given).expanduser() if given else SHARED
    where = f"RESBENCH_DATA={given}" if given else f"{SHARED} (RESBENCH_DATA is not set)"
    if root.is_file():
        return (root, "") if root.name.endswith((".tar.gz", ".tgz")) else (None, f"{where} is a file, not a CIFAR-10 archive")
    if (root / "cifar-10-python.tar.gz").exists() or (root / "cifar-10-batches-py").is_dir():
        return root, ""
    return None, f"no cifar-10-python.tar.gz or cifar-10-batches-py/ in {where}"


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """The real CIFAR-10 as a data root: $RESBENCH_DATA (a folder, or the archive itself), else ../shared/data."""
    root, why = _real_cifar()
    if root is None:
        SKIPPED_REAL_DATA.append(why)
        pytest.skip(f"real CIFAR-10 not found: {why}")
    return root


@pytest.fixture(scope="session")
def cifar_archive(cifar_root) -> Path:
    """The real CIFAR-10 as its .tar.gz (tests of the archive itself)."""
    archive = cifar_root if cifar_root.is_file() else cifar_root / "cifar-10-python.tar.gz"
    if not archive.exists():
        why = f"{cifar_root} holds the extracted folder, no cifar-10-python.tar.gz"
        SKIPPED_REAL_DATA.append(why)
        pytest.skip(why)
    return archive


def pytest_terminal_summary(terminalreporter):
    """Say loudly that tests were skipped for want of the real data: a green run would hide it."""
    if SKIPPED_REAL_DATA:
        terminalreporter.write_sep("!", "REAL-DATA TESTS SKIPPED", red=True, bold=True)
        for why in dict.fromkeys(SKIPPED_REAL_DATA):
            terminalreporter.write_line(f"  {why}")
        terminalreporter.write_line("  Point RESBENCH_DATA at CIFAR-10 (a folder or cifar-10-python.tar.gz) to run them.")


@pytest.fixture
def tiny():
    """A recipe small enough for a few seconds on 2 CPU cores."""
    from bench.specs import recipe

    return recipe("smoke", batch_size=32, iterations=16, eval_every=8, train_size=256, val_size=256, test_size=256)


@pytest.fixture
def interrupt(monkeypatch):
    """``interrupt(spec, out, ex)`` runs ``spec`` until its first checkpoint is written, then stops it as Ctrl-C
    would. Given a list of specs, it trains them as one group (run_group) until each has written one."""
    from bench import checkpoints, records
    from bench.train import run_group, run_one

    def run_until_first_checkpoint(spec, out, ex, **kw):
        specs = spec if isinstance(spec, list) else [spec]
        real_save, saved = checkpoints.save_torch, []

        def save_then_interrupt(obj, path):
            real_save(obj, path)
            if "ckpt" in str(path):
                saved.append(path)
                if len(saved) == len(specs):
                    raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(checkpoints, "save_torch", save_then_interrupt)
            with pytest.raises(KeyboardInterrupt):
                if isinstance(spec, list):
                    run_group(specs, out, ex, progress=False, **kw)
                else:
                    run_one(spec, out, ex, progress=False, **kw)
        for s in specs:
            assert records.paths(out, s.run_id)["ckpt"].exists()
            assert not records.paths(out, s.run_id)["run"].exists()

    return run_until_first_checkpoint


def pytest_collection_modifyitems(config, items):
    """Under mutmut, run the cheapest tests first: a mutant dies at its first failing test (mutmut
    runs pytest with -x), and the cheap, direct tests are the ones that usually kill it. mutmut hands
    pytest its tests in no particular order; their durations are in its stats file. A module's tests
    stay together (its module-scoped fixtures are set up once), modules ordered by their cheapest test."""
    if "__mutmut_" not in os.environ.get("MUTANT_UNDER_TEST", ""):
        return
    import json

    stats = ROOT / "mutmut-stats.json"  # ROOT is mutmut's copy of the checkout (mutants/)
    duration = json.loads(stats.read_text())["duration_by_test"] if stats.exists() else {}
    cost = {item: duration.get(item.nodeid, float("inf")) for item in items}
    first = {}
    for item in items:
        first[item.module] = min(first.get(item.module, float("inf")), cost[item])
    items.sort(key=lambda item: (first[item.module], item.module.__name__, cost[item]))
