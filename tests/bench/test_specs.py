"""Specs and records against hand-written expectations: recipe checks, presets, run identity, the
TOML round trip, flat record columns, atomic writes and the results-folder readers."""
import math
import datetime as dt
import json
import os
import pickle
import platform
import tomllib

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

import bench

from click.testing import CliRunner

from bench import checkpoints, env, records
from bench.cli import main
from bench.specs import PRESETS, RECIPES, Execution, Recipe, RunSpec, SweepSpec, model_name, recipe


@pytest.mark.parametrize("field,value,message", [
    ("batch_size", 0, "batch_size must be >= 1"),
    ("iterations", 0, "iterations must be >= 1"),
    ("eval_every", 0, "eval_every must be >= 1"),
    ("lr", 0.0, "lr must be positive"),
    ("val_size", -1, "val_size must be >= 0"),
    ("train_size", 31, "train_size must be at least batch_size"),
    ("test_size", 0, "test_size must be >= 1"),
])
def test_recipe_checks_each_field(field, value, message):
    with pytest.raises(ValueError, match=rf"^recipe 'x': {message}$"):
        Recipe("x", **{"batch_size": 32, field: value})
    # the boundary itself is allowed
    ok = {"batch_size": 1, "iterations": 1, "eval_every": 1, "lr": 1e-9, "val_size": 0, "train_size": 32, "test_size": 1}
    Recipe("x", **{"batch_size": 32, field: ok[field]})


def test_recipe_defaults_and_lr_schedule_by_hand():
    r = Recipe("x", lr=1.0, lr_decay=0.5, milestones=(10, 20), warmup_lr=0.25, warmup_iters=3, warmup_min_depth=20)
    assert (r.batch_size, r.momentum, r.weight_decay, r.iterations, r.val_size, r.eval_every) == (128, 0.9, 1e-4, 64_000, 5_000, 1_000)
    assert (r.train_size, r.test_size) == (None, None)
    assert [r.lr_at(i, 20) for i in (0, 2, 3, 9, 10, 19, 20, 99)] == [0.25, 0.25, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    assert [r.lr_at(i, 14) for i in (0, 2, 10)] == [1.0, 1.0, 0.5]  # shallower than warmup_min_depth
    with pytest.raises(ValueError, match="unknown recipe 'fast'; choose one of he2015, quick, smoke"):
        recipe("fast")
    assert recipe("smoke", lr=None, batch_size=16).batch_size == 16 and recipe("smoke", lr=None).lr == 0.05


def test_cosine_schedule_by_hand_after_the_warm_up_and_without_it():
    r = Recipe("x", lr=1.0, iterations=13, milestones=(5,), schedule="cosine", warmup_lr=0.25, warmup_iters=3,
               warmup_min_depth=20)
    # 10 steps after the warm-up: (1 + cos(pi k / 10)) / 2 at k = 0, 5, 9; milestones unused
    assert [r.lr_at(i, 20) for i in (0, 2, 3, 8, 12)] == pytest.approx([0.25, 0.25, 1.0, 0.5, 0.024471741852423])
    assert [r.lr_at(i, 14) for i in (0, 13 // 2, 12)] == pytest.approx([1.0, (1 + math.cos(math.pi * 6 / 13)) / 2,
                                                                     (1 + math.cos(math.pi * 12 / 13)) / 2])
    with pytest.raises(ValueError, match="schedule must be one of step, cosine"):
        Recipe("x", schedule="linear")
    # a recipe at the default schedule keeps the run_id of the versions before the field
    assert "schedule" not in RunSpec("resnet20", recipe("smoke")).identity()["recipe"]
    assert RunSpec("resnet20", recipe("smoke", schedule="cosine")).run_id != RunSpec("resnet20", recipe("smoke")).run_id


def test_presets_are_the_documented_ones():
    q, s = RECIPES["quick"], RECIPES["smoke"]
    assert (q.iterations, q.milestones, q.eval_every, q.batch_size, q.lr) == (6_400, (3_200, 4_800), 400, 128, 0.1)
    assert (s.batch_size, s.lr, s.iterations, s.milestones, s.val_size, s.train_size, s.test_size, s.eval_every) == \
        (64, 0.05, 400, (200, 300), 1_000, 5_000, 2_000, 100)
    assert PRESETS["smoke"] == dict(recipe="smoke", models=("plain", "resnet"), depths=(8, 20, 44), seeds=(0,), width=0.5)
    for name in ("he2015", "quick"):
        assert PRESETS[name] == dict(recipe=name, models=("plain", "resnet"), depths=(20, 32, 44, 56), seeds=(0,), width=1.0)


def test_run_identity_and_flat_columns():
    spec = RunSpec("plain20", recipe("smoke"), seed=3, width=0.5, shortcut="B", dataset="synthetic", sweep="s")
    digest = spec.run_id.rsplit("-", 1)[1]
    assert spec.run_id == f"plain20-synthetic-smoke-s3-{digest}" and len(digest) == 10
    ident = spec.identity()
    assert "sweep" not in ident and ident["seed"] == 3 and ident["recipe"]["name"] == "smoke"
    row = spec.flat()
    assert {k: row[k] for k in ("run_id", "sweep", "model", "family", "kind", "depth", "residual", "shortcut", "width",
                                "dataset", "seed", "recipe", "milestones", "batch_size")} == dict(
        run_id=spec.run_id, sweep="s", model="plain20", family="cifar", kind="plain", depth=20, residual=False,
        shortcut="B", width=0.5, dataset="synthetic", seed=3, recipe="smoke", milestones="200,300", batch_size=64)
    assert RunSpec("resnet20", recipe("he2015")).flat()["milestones"] == "32000,48000"
    for other in (dict(seed=4), dict(width=0.25), dict(shortcut="A"), dict(dataset="cifar10"), dict(model="resnet20")):
        assert RunSpec(**{**dict(model="plain20", recipe=recipe("smoke"), seed=3, width=0.5, shortcut="B",
                                 dataset="synthetic"), **other}).run_id != spec.run_id, other
    assert RunSpec.from_dict(spec.to_dict()) == spec == RunSpec.from_dict(spec.to_json())
    assert json.loads(spec.to_json()) == spec.to_dict() | {"recipe": {**spec.to_dict()["recipe"], "milestones": [200, 300]},
                                                           "lr_grid": [], "grid_seeds": []}
    with pytest.raises(ValueError, match="6n\\+2"):
        RunSpec("plain21", recipe("smoke"))


def test_model_names_of_grid_cells_stay_in_the_data_sets_family():
    assert [model_name(k, d) for k, d in (("plain", 20), ("resnet", 50), ("resnet", 152))] == \
        ["plain20", "cifar_resnet50", "cifar_resnet152"]
    assert [model_name(k, d, "imagenet") for k, d in (("plain", 18), ("resnet", 50), ("resnet", 152))] == \
        ["plain18", "resnet50", "resnet152"]
    assert model_name("preresnet", 56) == "preresnet56"
    # one rule for 18, 34, 50, 101, 152: never a silent switch of family, both families named in the refusal
    for depth in (18, 34, 101):
        with pytest.raises(ValueError, match=rf"depth {depth} is not a CIFAR-family depth .6n\+2.*ImageNet-style family "
                                             r".18, 34, 50, 101, 152."):
            model_name("resnet", depth)
    with pytest.raises(ValueError, match=r"depth 20 is not one of the ImageNet-style family's .18, 34, 50, 101, 152.*6n\+2"):
        model_name("resnet", 20, "imagenet")
    with pytest.raises(ValueError, match="fixup has no ImageNet-style nets"):
        model_name("fixup", 18, "imagenet")
    res = CliRunner().invoke(main, ["sweep", "--depths", "18", "--dataset", "synthetic"])
    assert res.exit_code == 1 and "depth 18 is not a CIFAR-family depth" in res.output


def test_union_grows_the_axes_merges_notes_and_names_every_other_difference():
    a = SweepSpec("n", recipe("smoke"), models=("plain",), depths=(8,), seeds=(0,), extra={"by": "a", "gpu": "x"})
    b = SweepSpec("n", recipe("smoke"), models=("resnet", "plain"), depths=(20, 8), seeds=(1,), extra={"by": "b"})
    u = a.union(b)  # notes may differ: they are not settings
    assert (u.models, u.depths, u.seeds) == (("plain", "resnet"), (8, 20), (0, 1))
    assert u.extra == {"by": "b", "gpu": "x"}
    c = SweepSpec("n", recipe("smoke", lr=0.1), width=0.5)
    with pytest.raises(ValueError, match=r"recipe.lr: 0.05 recorded, 0.1 asked for; width: 1.0 recorded, 0.5 asked for"):
        a.union(c)


def test_sweep_toml_round_trip_by_hand():
    sw = SweepSpec("n", recipe("he2015"), models=("resnet",), depths=(8, 14), seeds=(2,), width=0.5,
                   extra={"note": "x", "flag": True, "off": False})
    text = sw.to_toml()
    conf = tomllib.loads(text)
    assert conf["name"] == "n" and conf["depths"] == [8, 14] and conf["seeds"] == [2] and conf["width"] == 0.5
    assert conf["recipe"]["milestones"] == [32000, 48000] and "train_size" not in conf["recipe"]  # None is left out
    assert conf["extra"] == {"note": "x", "flag": True, "off": False}
    assert SweepSpec.from_toml(text) == sw
    by_hand = 'name = "h"\nmodels = ["plain"]\ndepths = [8]\nseeds = [0]\n[recipe]\nname = "mine"\niterations = 10\n'
    # a field left out is the Recipe default, milestones included; an empty list stays a constant lr
    assert SweepSpec.from_toml(by_hand).recipe == Recipe("mine", iterations=10)
    assert SweepSpec.from_toml(by_hand.replace("iterations", "milestones = []\niterations")).recipe.milestones == ()
    with pytest.raises(ValueError, match=r"^unknown model kind\(s\) vgg, mlp; choose from resnet, plain, preresnet, preplain, "
                                         r"highway, fixup, skipinit, rezero, dirac, tat$"):
        SweepSpec("n", recipe("smoke"), models=("vgg", "plain", "mlp"))
    with pytest.raises(ValueError, match="^a sweep needs at least one model kind, one depth and one seed$"):
        SweepSpec("n", recipe("smoke"), seeds=())
    runs = SweepSpec("n", recipe("smoke"), models=("plain", "resnet"), depths=(8, 14), seeds=(0, 1)).runs()
    assert [(r.model, r.seed) for r in runs[:4]] == [("plain8", 0), ("resnet8", 0), ("plain14", 0), ("resnet14", 0)]
    assert {r.sweep for r in runs} == {"n"} and len(runs) == 8


def test_execution_defaults_on_the_cpu():
    ex = Execution.for_device("cpu")
    assert (ex.device, ex.channels_last, ex.execution, ex.cudnn_benchmark, ex.eval_batch_size) == ("cpu", True, "eager", False, 500)
    assert Execution.for_device("cpu", amp=False, channels_last=False, execution="compile").execution == "compile"
    assert Execution() == Execution(device="cpu", amp=False, channels_last=False, execution="eager",
                                    cudnn_benchmark=False, eval_batch_size=1000)
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda"):
        Execution.for_device("mps")
    if not torch.cuda.is_available():
        assert Execution.for_device("auto").device == "cpu" and Execution.for_device().device == "cpu"  # auto
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            Execution.for_device("cuda")


def test_execution_defaults_on_a_gpu_machine(monkeypatch):
    """What a GPU machine gets (CUDA faked: only torch.cuda.is_available is asked): auto picks CUDA,
    with bf16, channels_last, cuDNN autotuning, one CUDA graph per step and large evaluation batches."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("auto", "cuda", "cuda:1"):
        ex = Execution.for_device(device)
        assert ex == Execution(device="cuda" if device == "auto" else device, amp=True, channels_last=True,
                               execution="cudagraph", cudnn_benchmark=True, eval_batch_size=2000)
    assert Execution.for_device("cuda", execution="eager", amp=False).execution == "eager"
    assert Execution.for_device("cpu").execution == "eager"  # a CPU run on a GPU machine
    with pytest.raises(ValueError, match="^execution must be one of eager, compile, cudagraph, got 'graph'$"):
        Execution.for_device("cuda", execution="graph")
    with pytest.raises(ValueError, match="^execution 'cudagraph' needs CUDA; use eager or compile on the CPU$"):
        Execution.for_device("cpu", execution="cudagraph")


def test_cpu_bf16_autocast_follows_what_onednn_reports():
    """bf16 autocast on the CPU only where oneDNN runs bf16 natively (elsewhere it is slower than fp32)."""
    from bench.specs import _cpu_bf16

    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert _cpu_bf16() is bool(native) and Execution.for_device("cpu").amp is bool(native)


# -- records ---------------------------------------------------------------------------------------

def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "sub" / "dir" / "t.parquet"  # folders made as needed
    records.write_parquet(pd.DataFrame({"a": [1]}), target)
    with pytest.raises(RuntimeError):
        def fail(tmp):
            tmp.write_text("half")
            raise RuntimeError("disk full")
        records.atomic_write(target, fail)
    assert pd.read_parquet(target)["a"].tolist() == [1]
    assert sorted(p.name for p in target.parent.iterdir()) == ["t.parquet"]  # no temporary left behind
    seen = []
    records.atomic_write(target, lambda tmp: seen.append(tmp) or tmp.write_bytes(b"x"))
    (tmp,) = seen
    # beside its target (one file system: the rename is atomic), per process (two writers never share
    # one), and never taken for a table by a reader globbing *.parquet meanwhile
    assert tmp.parent == target.parent and str(os.getpid()) in tmp.name and not tmp.match("*.parquet")
    assert target.read_bytes() == b"x" and not tmp.exists()


def test_parquet_tables_hold_their_columns_only(tmp_path):
    # a filtered frame keeps its row labels; written as a column they would reach every other reader
    # (pyarrow, polars, duckdb) as a stray "__index_level_0__"
    records.write_parquet(pd.DataFrame({"a": [1, 2, 3]}).iloc[[2]], tmp_path / "t.parquet")
    assert pq.read_schema(tmp_path / "t.parquet").names == ["a"]
    assert pd.read_parquet(tmp_path / "t.parquet").index.tolist() == [0]


def test_paths_and_readers(tmp_path):
    p = records.paths(tmp_path, "r1")
    assert p == {"run": tmp_path / "runs" / "r1.parquet", "curves": tmp_path / "curves" / "r1.parquet",
                 "weights": tmp_path / "weights" / "r1.pt", "layers": tmp_path / "layers" / "r1.parquet",
                 "signals": tmp_path / "signals" / "r1.parquet", "ckpt": tmp_path / "ckpt" / "r1.pt",
                 "errors": tmp_path / "errors"}
    runs, curves = records.load(tmp_path)
    assert runs.empty and curves.empty and records.finished(tmp_path) == {} and records.recorded(tmp_path, "r1") is None
    records.write_table(pd.DataFrame([dict(run_id="r1", status="ok")]), "runs", p["run"])
    records.write_table(pd.DataFrame([dict(run_id="r2", status="failed")]), "runs", records.paths(tmp_path, "r2")["run"])
    records.write_table(pd.DataFrame(columns=["run_id", "status"]), "runs", records.paths(tmp_path, "r3")["run"])  # empty
    assert records.finished(tmp_path) == {"r1": "ok", "r2": "failed"}
    row = records.recorded(tmp_path, "r2")
    assert (row["run_id"], row["status"], row["schema_version"]) == ("r2", "failed", 2) and pd.isna(row["error"])
    runs = records.load(tmp_path)[0]
    assert runs["run_id"].tolist() == ["r1", "r2"] and runs.index.tolist() == [0, 1]  # one row label per row
    assert records.DONE == ("ok", "diverged")
    # an empty table (a run's curves before its first evaluation point, say) leaves the others' types alone
    records.write_table(pd.DataFrame([dict(run_id="a", iteration=8, test_err=0.25)]), "curves", tmp_path / "curves" / "a.parquet")
    records.write_table(pd.DataFrame(columns=["run_id", "iteration", "test_err"]), "curves", tmp_path / "curves" / "b.parquet")
    curves = records.load(tmp_path)[1]
    assert (curves["iteration"].dtype, curves["test_err"].dtype, len(curves)) == ("int64", "float64", 1)
    with pytest.raises(FileNotFoundError, match=f"^results folder {tmp_path / 'absent'} does not exist$"):
        records.load(tmp_path / "absent")


def test_environment_columns(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    machine = env.environment("cpu")
    assert machine["device"] == "cpu" and machine["gpu_name"] is None and machine["cudnn_version"] is None
    assert machine["cuda_visible_devices"] == "3" and machine["torch_version"] == torch.__version__
    assert machine["cpu_threads"] == torch.get_num_threads() and machine["utc_time"].endswith("+00:00")
    assert "hostname" not in machine and "host" not in machine
    assert (machine["cpu"], machine["cpu_isa"]) == env.cpu_info() and machine["cuda_version"] == torch.version.cuda
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["python_version"] == platform.python_version() and machine["resbench_version"] == bench.__version__
    assert (machine["git_sha"], machine["git_dirty"]) == env._git()
    age = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(machine["utc_time"])
    assert dt.timedelta(0) <= age < dt.timedelta(minutes=1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert env.environment("cpu")["cuda_visible_devices"] is None


def test_the_cpu_is_named_by_its_model_and_the_instruction_sets_that_change_its_numbers(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9554 64-Core Processor\n"
                   "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 sha_ni\n\n"
                   "processor\t: 1\nmodel name\t: AMD EPYC 9554 64-Core Processor\nflags\t\t: fpu\n")
    assert env.cpu_info(x86) == ("AMD EPYC 9554 64-Core Processor", "avx2,fma,avx512f,avx512_bf16")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n")
    model, isa = env.cpu_info(arm)  # no model name: what platform knows
    assert model == (platform.processor() or platform.machine()) and isa == "asimd,sve,bf16,i8mm"
    assert env.cpu_info(tmp_path / "absent") == (platform.processor() or platform.machine(), "")


def test_environment_names_the_gpu_of_a_cuda_run_only(monkeypatch):
    # what a GPU machine reports, faked: a CUDA run records its GPU, a CPU run on that machine none
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: f"Fake GPU {d}")
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: 91000)
    assert env.environment("cuda:1")["gpu_name"] == "Fake GPU cuda:1"
    assert env.environment("cuda:1")["cudnn_version"] == 91000
    assert env.environment("cpu")["gpu_name"] is None and env.environment("cpu")["cudnn_version"] is None


def test_git_sha_from_the_environment(monkeypatch):
    env._git.cache_clear()
    monkeypatch.setenv("RESBENCH_GIT_SHA", "abc123")
    monkeypatch.setenv("RESBENCH_GIT_DIRTY", "1")
    try:
        assert env._git() == ("abc123", True)
        env._git.cache_clear()
        monkeypatch.setenv("RESBENCH_GIT_DIRTY", "0")
        assert env._git() == ("abc123", False)
    finally:
        env._git.cache_clear()


def test_load_torch_refuses_damage_and_code(tmp_path):
    good = tmp_path / "g.pt"
    checkpoints.save_torch({"w": torch.ones(2), "n": 3}, good)
    assert checkpoints.load_torch(good)["n"] == 3
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(checkpoints.UnreadableFile, match=r"empty.pt is damaged \(EOFError: \)$"):
        checkpoints.load_torch(tmp_path / "empty.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:40])  # a copy cut short
    with pytest.raises(checkpoints.UnreadableFile, match=r"cut.pt is damaged \(RuntimeError: PytorchStreamReader failed"):
        checkpoints.load_torch(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")  # torch reports it as a weights-only failure
    with pytest.raises(checkpoints.UnreadableFile, match=r"junk.pt is damaged \(UnpicklingError: Unsupported operand"):
        checkpoints.load_torch(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        checkpoints.load_torch(tmp_path / "absent.pt")
    torch.save({"f": os.getcwd}, tmp_path / "code.pt")  # a callable: needs a full pickle load
    with pytest.raises(checkpoints.UnreadableFile, match="beyond tensors and plain containers.*regenerate"):
        checkpoints.load_torch(tmp_path / "code.pt")


@pytest.mark.parametrize("message, detail", [
    ("Weights only load failed.\n\nCheck the documentation of torch.load", "Weights only load failed."),
    ("", ""),
])
def test_load_torch_names_damage_even_when_torch_gives_no_reason(tmp_path, monkeypatch, message, detail):
    # the detail is torch's first line past its boilerplate; a message that is all boilerplate gives its first
    # line, and an empty one nothing (the error still says which file is damaged)
    def fail(*a, **k):
        raise pickle.UnpicklingError(message)

    monkeypatch.setattr(torch, "load", fail)
    with pytest.raises(checkpoints.UnreadableFile) as e:
        checkpoints.load_torch(tmp_path / "x.pt")
    assert str(e.value) == f"{tmp_path / 'x.pt'} is damaged (UnpicklingError: {detail})"


def test_load_torch_stays_weights_only_and_maps_to_the_device_asked(tmp_path, monkeypatch):
    # torch reads an unset weights_only as False when this variable is set: ours is explicit, so a
    # user's environment cannot turn a crafted checkpoint back into code that runs
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"f": os.getcwd}, tmp_path / "code.pt")
    with pytest.raises(checkpoints.UnreadableFile, match="beyond tensors"):
        checkpoints.load_torch(tmp_path / "code.pt")
    # a checkpoint from another device lands where the resuming run asks ("meta" stands in for a GPU)
    checkpoints.save_torch({"w": torch.ones(2)}, tmp_path / "w.pt")
    assert checkpoints.load_torch(tmp_path / "w.pt", map_location="meta")["w"].device.type == "meta"


def test_seeds_take_a_range_and_a_refused_list_gives_an_example_of_its_own_kind(tmp_path):
    res = CliRunner().invoke(main, ["sweep", "--seeds", "0-2", "--executor", "slurm", "--dry-run", "--depths", "8",
                                    "--kinds", "resnet"])
    assert res.exit_code == 0 and "dry run: 3 runs" in res.output and "-s2-" in res.output, res.output  # seeds 0, 1, 2
    bad = CliRunner().invoke(main, ["sweep", "--seeds", "0..2"])
    assert bad.exit_code == 2 and "such as 0,1,2 or 0-4" in bad.output
    # another recipe in the folder: the error names the recipe's fields that differ, not both whole recipes
    a = SweepSpec("s", recipe("smoke"))
    with pytest.raises(ValueError) as e:
        a.union(SweepSpec("s", recipe("smoke", lr=0.1)))
    assert "recipe.lr: 0.05 recorded, 0.1 asked for" in str(e.value) and "momentum" not in str(e.value)
