"""A user's own network: a package built and installed here (into a temporary folder, by pip, with its
``resbench.networks`` entry point), and a module named with --plugin / RESBENCH_PLUGINS; then real
subprocesses sweep, diagnose, report and profile it like a built-in kind.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from bench import records

ROOT = Path(__file__).resolve().parents[2]

PLUGIN = textwrap.dedent('''
    """A residual net whose classifier starts scaled: a family registered from outside resbench."""
    import torch

    from resnet.blocks import BasicBlock
    from resnet.methods import cifar_net
    from resnet.registry import Family

    __version__ = "{version}"


    def build(depth, *, num_classes, width, in_channels, shortcut, head_scale):
        net = cifar_net(depth, BasicBlock, num_classes=num_classes, width=width, in_channels=in_channels,
                        residual=True)
        with torch.no_grad():
            net.fc.weight.mul_(head_scale)
        return net


    def register(register):
        register(Family("{kind}", build, residual=True, normalization="bn", paper="a test plugin",
                        params=dict(head_scale=0.5)))
''')

TINY = ["--dataset", "synthetic", "--depths", "8", "--width", "0.25", "--batch-size", "32", "--train-size", "128",
        "--val-size", "32", "--test-size", "64", "--iterations", "4", "--eval-every", "2", "--device", "cpu"]


def _install(tmp_path, version):
    """Build and install the package 'resbench-tinyres' (module tinyres, kind tinyres) into its own folder."""
    pkg = tmp_path / f"pkg-{version}"
    pkg.mkdir()
    (pkg / "tinyres.py").write_text(PLUGIN.format(version=version, kind="tinyres"))
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f'''
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "resbench-tinyres"
        version = "{version}"

        [project.entry-points."resbench.networks"]
        tinyres = "tinyres:register"

        [tool.setuptools]
        py-modules = ["tinyres"]
    '''))
    site = tmp_path / f"site-{version}"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--target", str(site), str(pkg)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return site


def _bench(args, site=None, timeout=300, **env):
    paths = [str(site)] if site else []
    e = os.environ | {"PYTHONPATH": os.pathsep.join(paths + [str(ROOT)])} | env
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, env=e,
                          timeout=timeout)


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_an_installed_plugin_sweeps_diagnoses_reports_and_profiles_like_a_built_in_kind(tmp_path):
    site = _install(tmp_path, "0.3.0")
    listed = _bench(["models", "--kinds", "tinyres", "--depths", "8", "--no-imagenet"], site)
    assert listed.returncode == 0, listed.stderr
    assert "tinyres" in listed.stdout and "[plugin resbench-tinyres==0.3.0]" in listed.stdout
    out = tmp_path / "out"
    sweep = _bench(["sweep", "--models", "tinyres,resnet", *TINY, "--out", str(out)], site)
    assert sweep.returncode == 0, sweep.stdout + sweep.stderr
    runs = records.load(out)[0].set_index("model")
    row = runs.loc["tinyres8"]
    assert (row["status"], row["method"], row["plugin"], row["method_params"]) == (
        "ok", "tinyres", "resbench-tinyres==0.3.0", '{"head_scale": 0.5}')
    assert pd.isna(runs.loc["resnet8", "plugin"])
    for command in (["diagnose", str(out), "--max-images", "64", "--draws", "2"], ["report", str(out), "--no-responses"],
                    ["profile", "--device", "cpu", "--models", "tinyres8", "--batch-sizes", "8", "--precisions", "fp32",
                     "--formats", "nchw", "--modes", "train", "--repeats", "1", "--block-s", "0.01", "--warmup", "1",
                     "--no-baseline", "--out", str(tmp_path / "prof")]):
        res = _bench(command, site)
        assert res.returncode == 0, res.stdout + res.stderr
    assert set(pd.read_parquet(out / "analysis" / "lesion.parquet")["model"]) == {"tinyres8", "resnet8"}
    assert "tinyres" in (out / "report" / "report.md").read_text()
    # the plugin's version is part of what a run is: another version, another run_id
    newer = _install(tmp_path, "0.4.0")
    ask = ["-c", "from bench.specs import RunSpec, recipe; print(RunSpec('tinyres8', recipe('smoke')).run_id)"]
    ids = [subprocess.run([sys.executable, *ask], capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": f"{s}{os.pathsep}{ROOT}"}).stdout.strip() for s in (site, newer)]
    assert ids[0].startswith("tinyres8-cifar10-smoke-s0-") and ids[0] != ids[1]


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_a_plugin_module_by_option_or_environment_and_a_broken_one_named(tmp_path):
    module = tmp_path / "mynets.py"
    module.write_text(PLUGIN.format(version="1.0", kind="mynet"))
    by_option = _bench(["--plugin", str(module), "models", "--kinds", "mynet", "--depths", "8", "--no-imagenet"])
    assert by_option.returncode == 0 and "[plugin mynets==1.0]" in by_option.stdout, by_option.stderr
    out = tmp_path / "out"
    by_env = _bench(["sweep", "--models", "mynet", *TINY, "--out", str(out)], RESBENCH_PLUGINS=str(module))
    assert by_env.returncode == 0, by_env.stdout + by_env.stderr
    assert records.load(out)[0]["plugin"].tolist() == ["mynets==1.0"]
    # a plugin that fails to import is named, and the built-in kinds still work
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('this plugin is broken')\n")
    env = dict(RESBENCH_PLUGINS=f"{broken},no_such_module")
    bad = _bench(["sweep", "--models", "mynet", *TINY, "--out", str(tmp_path / "bad")], **env)
    assert bad.returncode == 1 and "unknown model kind(s) mynet" in bad.stderr + bad.stdout
    text = bad.stderr + bad.stdout
    assert f"module {broken}: RuntimeError: this plugin is broken" in text and "no_such_module: ModuleNotFoundError" in text
    assert "choose from resnet, plain, preresnet, preplain, highway" in text
    fine = _bench(["sweep", "--models", "plain", *TINY, "--out", str(tmp_path / "fine")], **env)
    assert fine.returncode == 0, fine.stdout + fine.stderr
    unknown = _bench(["run", "nosuchnet20", *TINY[:2], "--out", str(tmp_path / "u")])
    assert unknown.returncode == 1 and "unknown network 'nosuchnet20'" in unknown.stderr and "tat{d}" in unknown.stderr


def test_kind_lookups_scan_the_installed_packages_once_per_process(monkeypatch):
    """diagnose parses a run's name per layer and per lesion (thousands of lookups); each used to rescan every
    installed distribution's entry points (~4 ms): 43 of its 52 s on four tiny nets."""
    import importlib.metadata

    import resnet
    from resnet import registry

    scans = []
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    registry._entry_points.cache_clear()
    loads = []
    monkeypatch.setattr(registry, "load_plugins", lambda real_load=registry.load_plugins: loads.append(1) or real_load())
    for _ in range(50):
        for kind in ("resnet", "plain", "fixup", "tat"):
            resnet.parse(f"{kind}20").residual
    assert loads == []  # a registered kind is found without loading plugins
    with pytest.raises(ValueError, match="unknown network"):
        resnet.parse("nosuchkind20")  # an unknown one loads them (a plugin may register it), ...
    resnet.kinds(), resnet.kinds()
    assert len(loads) >= 3 and scans == [dict(group="resbench.networks")]  # ... scanning the packages once
    registry._entry_points.cache_clear()
