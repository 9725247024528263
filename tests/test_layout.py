"""The layout a reader relies on: data flows one way (ARCHITECTURE.md), so the packages import downwards.

Imports are read from the source (every ``import`` and ``from ... import``, also inside functions,
where the deferred imports of the CLI live), not from what a run happened to load.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports(package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports (bench.x or resnet.x as 'x')."""
    modules = {p.stem for p in (ROOT / package).glob("*.py")}
    graph = {}
    for name in modules:
        found = set()
        for node in ast.walk(ast.parse((ROOT / package / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.level:  # from .blocks import ...
                    found.add(node.module.split(".")[0])
                elif node.module == package:
                    found |= {a.name for a in node.names if a.name in modules}
                elif node.module.startswith(package + "."):
                    found.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        graph[name] = found - {name, "__init__", "__main__"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as a path that ends where it started), or None."""
    state: dict[str, str] = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert _cycle({"sweep": {"slurm", "train"}, "slurm": {"train", "sweep"}, "train": set()}) == ["slurm", "sweep", "slurm"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_bench_or_resnet():
    for package in ("bench", "resnet"):
        assert _cycle(_imports(package)) is None, package


def test_the_networks_know_nothing_of_the_benchmark():
    for path in (ROOT / "resnet").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not [n for n in names if n == "bench" or n.startswith("bench.")], path.name


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# ARCHITECTURE.md's layers: what reads records never reaches what trains
TRAINING = {"train", "steps", "fuse", "probes", "sweep", "slurm", "ddp"}
RECORD_READERS = ("report", "report_why", "report_tuning", "profile_tables", "tuning", "outcome", "cost")


def test_what_reads_records_never_reaches_the_trainer():
    graph = _imports("bench")
    for module in RECORD_READERS:
        assert not _reach(graph, module) & TRAINING, (module, sorted(_reach(graph, module) & TRAINING))


def test_the_reach_finder_sees_a_planted_path_to_the_trainer():
    graph = {"report": {"analysis"}, "analysis": {"train"}, "train": set()}
    assert _reach(graph, "report") == {"analysis", "train"}


def test_no_function_in_bench_or_resnet_is_over_80_lines():
    long = []
    for package in ("bench", "resnet"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    long.append(f"{package}/{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})")
    assert long == []


# the reader side: a report, the tuning's choice and the verdicts of old records need neither torch nor the
# registry of nets (what the report knows of a net is in its rows: net_label, baseline, pre_activation, has_bn)
TORCH_FREE = ("report", "report_why", "report_tuning", "profile_tables", "tuning", "outcome", "verdicts", "records",
              "schema", "published", "datasets")
HEAVY = ("torch", "torchvision", "einops", "resnet")


def _external(module: str) -> set[str]:
    """The top-level packages bench/<module>.py imports (anywhere in it, functions included)."""
    tree = ast.parse((ROOT / "bench" / f"{module}.py").read_text())
    names = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    return names | {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_the_reader_side_imports_neither_torch_nor_the_networks():
    graph = _imports("bench")
    for module in TORCH_FREE:
        for m in {module} | _reach(graph, module):
            assert not _external(m) & set(HEAVY), (module, m, sorted(_external(m) & set(HEAVY)))


def test_importing_the_report_loads_no_torch():
    import subprocess
    import sys

    code = "import sys, bench.report, bench.tuning, bench.verdicts; print(sorted(m for m in sys.modules if m.split('.')[0] in %r))"
    res = subprocess.run([sys.executable, "-c", code % (HEAVY,)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_the_cli_and_its_help_load_no_torch():
    import subprocess
    import sys

    code = ("import sys; from click.testing import CliRunner; from bench.cli import main\n"
            "for c in ([], ['sweep'], ['run'], ['profile'], ['report'], ['diagnose'], ['estimate'], ['status'], ['pack']):\n"
            "    assert CliRunner().invoke(main, c + ['--help']).exit_code == 0, c\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in %r))")
    res = subprocess.run([sys.executable, "-c", code % (HEAVY,)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr


def test_no_branch_on_a_data_set_or_a_kind_by_name_outside_their_registries():
    """What a data set is (streams, its family of nets) and what a kind is (pre-activation, group-able) are
    attributes, stated once in bench/datasets.py and the families: no `dataset in TREES`, no `kind in (...)`."""
    import re

    pattern = re.compile(r"in TREES\b|\bdataset in \(|\bkind in \(")
    found = [f"{p.relative_to(ROOT)}:{i}" for package in ("bench", "resnet") for p in sorted((ROOT / package).glob("*.py"))
             if p.name != "datasets.py" for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert found == []
