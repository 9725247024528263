"""What a user reads: every command block of README.md and results/README.md, and the help texts.

A command block is an indented (4 spaces) block of shell lines. Each one that runs resbench, pytest
or pip is marked in the Markdown source with a comment on the line before it:

    <!-- runnable -->                         run as typed
    <!-- runnable {"replace": [["a", "b"]]} -->   run a short form: each "a" replaced by "b" first
                                               ("from": "text" starts at that text, skipping an install)
    <!-- needs: a Slurm cluster -->            not run here; the text beside it says what it needs

Runnable blocks run in document order, as a reader would, with the venv's bin on PATH, in a scratch
copy of the repository's results/ beside a link to ../shared (the offline data), so no committed
record is touched. A block that fails, or a command block without a marker, fails the build.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bench import checkpoints
from bench.cli import main

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"^<!--\s*(runnable|needs:)\s*(.*?)\s*-->\s*$")
COMMAND = re.compile(r"^\s*(\$ )?(\.venv/bin/)?(resbench|python3? -m (pytest|bench|venv|torch\.distributed\.run)|python3? -c|pytest|pip|bash \.ci)\b")


def command_blocks(path: Path) -> list[dict]:
    """Every indented code block of ``path`` that holds a command: its line, text and marker."""
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].startswith("    ") and (i == 0 or not lines[i - 1].strip()):
            start = i
            while i < len(lines) and (lines[i].startswith("    ") or not lines[i].strip()):
                i += 1
            body = [line[4:] for line in lines[start:i]]
            while body and not body[-1].strip():
                body.pop()
            j = start - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = MARK.match(lines[j]) if j >= 0 else None
            if any(COMMAND.match(b) for b in body):
                out.append(dict(file=path.relative_to(ROOT).as_posix(), line=start + 1, text="\n".join(body),
                                kind=mark.group(1) if mark else None, options=mark.group(2) if mark else ""))
        else:
            i += 1
    return out


def _shell(block: dict) -> str:
    """The block as a script: continuation lines joined, the marker's short form applied."""
    text = block["text"].replace("\\\n", " ")
    opts = json.loads(block["options"]) if block["options"] else {}
    for old, new in opts.get("replace", []):
        assert old in text, f"{block['file']}:{block['line']}: {old!r} is not in the block (stale marker)"
        text = text.replace(old, new)
    if "from" in opts:
        assert opts["from"] in text, f"{block['file']}:{block['line']}: {opts['from']!r} is not in the block"
        text = text[text.index(opts["from"]):]
    return text


BLOCKS = [b for f in ("README.md", "results/README.md") for b in command_blocks(ROOT / f)]


def test_every_command_block_is_marked_runnable_or_says_what_it_needs():
    assert len(BLOCKS) > 10
    unmarked = [f"{b['file']}:{b['line']}" for b in BLOCKS if b["kind"] is None]
    assert unmarked == [], "mark these <!-- runnable --> (with a short form if long) or <!-- needs: ... -->"
    assert all(b["options"] for b in BLOCKS if b["kind"] == "needs:")


def test_the_ci_runs_the_readmes_test_command_exactly():
    """.ci/run is the README's second command, on a clean clone."""
    tests = [b for b in BLOCKS if b["file"] == "README.md" and "pytest" in b["text"]][0]["text"]
    assert tests.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, cifar_root):
    """A reader's working copy: results/ copied (commands may write there), ../shared linked."""
    base = tmp_path_factory.mktemp("reader")
    repo = base / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "results", repo / "results")
    shared = ROOT.parent / "shared"
    if shared.is_dir():
        (base / "shared").symlink_to(shared)
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RESBENCH_DATA": str(cifar_root),
                        "PYTHONPATH": str(ROOT)}
    return repo, env


@pytest.mark.slow  # subprocesses: left out of mutation runs
@pytest.mark.parametrize("block", [b for b in BLOCKS if b["kind"] == "runnable"],
                         ids=lambda b: f"{b['file']}:{b['line']}")
def test_a_runnable_block_runs(block, scratch):
    repo, env = scratch
    script = _shell(block)
    res = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"{block['file']}:{block['line']} failed:\n{script}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"


# -- help texts state the defaults the code uses -----------------------------------------------------

def _help(*command) -> str:
    res = CliRunner().invoke(main, [*command, "--help"], terminal_width=400)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())  # one line: click wraps


def test_sweep_help_states_each_presets_recipe_and_grid():
    from bench.specs import PRESETS, RECIPES

    text = _help("sweep")
    for name, preset in PRESETS.items():
        r = RECIPES[preset["recipe"]]
        assert f"{name} {r.iterations}" in text and f"{name} {r.batch_size}" in text and f"{name} {r.lr:g}" in text
        assert f"{name} {r.train_size or 'all'}" in text and f"{name} {r.test_size or 'all'}" in text
        assert f"{name} {r.eval_every}" in text and f"{name} {r.val_size}" in text
        assert f"{name} {','.join(map(str, r.milestones)) or 'none'}" in text
        assert f"{name} {','.join(map(str, preset['depths']))}" in text and f"{name} {preset['width']:g}" in text


def test_execution_help_states_the_devices_defaults(monkeypatch):
    import torch

    from bench.specs import Execution, _cpu_bf16

    text = _help("sweep")
    cpu = Execution.for_device("cpu")
    assert cpu.amp == _cpu_bf16() and "on for CUDA and for CPUs with native bf16" in text
    assert cpu.channels_last and "NHWC memory format [default: on]" in text
    assert cpu.execution == "eager" and "[default: cudagraph on CUDA, eager on the CPU]" in text
    assert cpu.pad_input == 0 and "(0: off) [default: 0]" in text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cuda = Execution.for_device("cuda")
    assert (cuda.amp, cuda.channels_last, cuda.execution, cuda.pad_input) == (True, True, "cudagraph", 0)


def test_profile_and_diagnose_help_state_their_defaults():
    import inspect

    from bench.analysis import LESION_DRAWS, TREE_IMAGES, diagnose
    from bench.profile import DEFAULTS

    text = _help("profile")
    for key in ("models", "batch_sizes", "precisions", "formats", "executions"):
        cpu, cuda = (','.join(map(str, DEFAULTS[d][key])) for d in ('cpu', 'cuda'))
        assert f"{cpu} on the CPU; {cuda} on CUDA" in text, key
    assert f"[default: {DEFAULTS['cpu']['workers']} on the CPU; {DEFAULTS['cuda']['workers']} on CUDA]" in text
    text = _help("diagnose")
    assert inspect.signature(diagnose).parameters["max_images"].default is None and f"[default: all; {TREE_IMAGES} of an ImageNet-style val/]" in text
    assert f"[default: {LESION_DRAWS};" in text and "recorded data_source, else $RESBENCH_DATA" in text
    assert "data_source" not in _help("report") and "--data-root" not in _help("report")  # the report reads records only


def test_diagnose_reads_the_test_images_from_the_runs_recorded_data_source(tmp_path, monkeypatch):
    """What diagnose --data-root's help says: without it, the copy each run recorded comes first."""
    import pandas as pd

    from bench import analysis, data, records
    from bench.specs import RunSpec, recipe

    source = tmp_path / "their-copy.tar.gz"
    source.write_bytes(b"")
    runs = pd.DataFrame([dict(run_id="r", status="ok", data_source=str(source))])
    spec = RunSpec("resnet8", recipe("smoke"))
    checkpoints.save_torch(dict(spec=spec.to_json(), model={}, num_classes=10, in_channels=3),
                       records.paths(tmp_path, "r")["weights"])
    asked = []

    def load(dataset, root=None, download=False):
        asked.append(root)
        raise data.DataError("not needed further")

    monkeypatch.setattr(data, "load", load)
    with pytest.raises(data.DataError):
        next(analysis._saved_nets(tmp_path, runs, None, None, "test"))
    with pytest.raises(data.DataError):
        next(analysis._saved_nets(tmp_path, runs, tmp_path / "given", None, "test"))
    assert asked == [str(source), tmp_path / "given"]


def test_sweep_help_groups_its_options_under_headings_and_every_option_has_one():
    from bench.cli import sweep

    text = CliRunner().invoke(main, ["sweep", "--help"], terminal_width=200).output
    headings = [line.rstrip(":") for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[:2] == ["What to train", "Methods compared"] and "Other options" in headings
    placed = {n for names in sweep.sections.values() for n in names}
    assert {p.name for p in sweep.params if p.name != "help"} <= placed  # a new option must be given a heading
    parallel = text[text.index("Parallelism"):text.index("Slurm (--executor slurm)")]
    for option in ("--jobs", "--runs-per-gpu", "--fuse", "--gpus-per-run", "--procs-per-run", "--nodes"):
        assert option in parallel, option
    assert "Other options:\n  -h, --help" in text.replace("\r", "")


def test_one_name_per_concept_across_commands_and_the_old_names_still_work(tmp_path):
    """Kinds are --kinds (sweep, estimate, models), networks by name --nets (profile), decoding processes
    --loader-workers, the padded input --pad-input; the earlier names work, hidden, for a release."""
    assert "--kinds" in _help("sweep") and "--kinds" in _help("estimate") and "--kinds" in _help("models")
    assert "--nets" in _help("profile") and "--pad-input" in _help("profile") and "--loader-workers" in _help("profile")
    assert "--loader-workers" in _help("check-data")
    for command in ("sweep", "estimate", "profile", "check-data"):
        shown = _help(command)
        assert "--models" not in shown and "--pad-inputs" not in shown and "--workers " not in shown, command
    assert "--pad-input" not in _help("run")  # a lone run is never padded
    base = ["sweep", "--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--iterations", "2", "--eval-every",
            "1", "--train-size", "64", "--val-size", "32", "--test-size", "32", "--batch-size", "32"]
    old = CliRunner().invoke(main, base + ["--models", "plain", "--out", str(tmp_path / "a")])
    assert old.exit_code == 0 and "1 runs" in old.output, old.output
    (tmp_path / "c.toml").write_text('models = ["resnet"]\n')  # an earlier config file's key
    conf = CliRunner().invoke(main, base + ["--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "b")])
    assert conf.exit_code == 0 and "resnet8" in conf.output, conf.output


def test_without_a_terminal_a_run_says_where_it_is_at_each_evaluation_point_and_the_sweep_how_long_is_left(tmp_path):
    res = CliRunner().invoke(main, ["sweep", "--dataset", "synthetic", "--kinds", "plain,resnet", "--depths", "8",
                                    "--width", "0.25", "--iterations", "4", "--eval-every", "2", "--train-size", "64",
                                    "--val-size", "32", "--test-size", "32", "--batch-size", "32", "--out",
                                    str(tmp_path)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    steps = [ln for ln in lines if ln.startswith("plain8 seed 0: step ")]
    assert [ln.split(",")[0] for ln in steps] == ["plain8 seed 0: step 2/4", "plain8 seed 0: step 4/4"]
    assert re.search(r"train_err \d+\.\d %, val_err \d+\.\d %, img_s \d+, data_wait \d+ %, \d+ s so far, about \d+ s left",
                     steps[0])
    first = next(ln for ln in lines if ln.startswith("[1/2] plain8"))
    assert re.search(r"train err \d+\.\d %, test err \d+\.\d %", first) and "the sweep: about" in first
    assert "the sweep" not in next(ln for ln in lines if ln.startswith("[2/2]"))


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_the_main_command_as_typed_writes_only_into_the_clone_and_the_users_cache(tmp_path, cifar_archive):
    """A new user's first command, with their own archive given the way the README says (RESBENCH_DATA) and an
    empty home: nothing is created beside the clone; only the clone and ~/.cache/resbench are written."""
    main_block = next(b for b in BLOCKS if b["file"] == "README.md" and "--preset smoke --download" in b["text"])
    assert "RESBENCH_DATA" not in main_block["text"] and "shared" not in main_block["text"]
    clone, home = tmp_path / "clone", tmp_path / "home"
    clone.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RESBENCH_CACHE", "RESBENCH_DATA")}
    env |= {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HOME": str(home),
            "RESBENCH_DATA": str(cifar_archive), "PYTHONPATH": str(ROOT)}
    res = subprocess.run(["bash", "-e", "-c", _shell(main_block)], cwd=clone, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clone", "home"]  # nothing beside the clone
    written = [p.relative_to(home) for p in home.rglob("*") if p.is_file()]
    assert any(p.parts[:2] == (".cache", "resbench") for p in written)  # the decoded data set
    assert all(p.parts[0] == ".cache" for p in written), written  # the user's cache (matplotlib's fonts there too)
    assert (clone / "results" / "smoke" / "report" / "report.html").exists()


