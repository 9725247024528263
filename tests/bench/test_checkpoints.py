"""Safe to share: no file the project reads runs code, damaged state heals, bad options stop early.

Every hostile file is made here: a pickle whose ``__reduce__`` would create a marker file when
loaded. The marker must never appear.
"""
import tarfile

import pandas as pd
import pytest
import torch

from bench import checkpoints, data, records
from bench.report import build_report
from bench.specs import Execution, RunSpec
from bench.train import run_one
from tests.fakes import cifar_python_dir

CPU = Execution.for_device("cpu")


class Marker:
    """Unpickling this calls open(path, "w"): a stand-in for any code a crafted file could run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_crafted_cache_entry_runs_nothing_and_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # torch then loads code unless told not to
    cifar_python_dir(tmp_path / "src", n=8)
    first = data.load("cifar10", tmp_path / "src")
    (entry,) = (tmp_path / "cache").iterdir()
    marker = tmp_path / "pwned"
    torch.save({"train_x": Marker(marker)}, entry)
    again = data.load("cifar10", tmp_path / "src")
    assert not marker.exists() and torch.equal(again.train_x, first.train_x)


def test_a_crafted_data_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    folder = cifar_python_dir(tmp_path / "d", n=8, test_labels=Marker(marker))
    with pytest.raises(data.DataError, match=r"test_batch asks to load (io|builtins)\.open.*refusing"):
        data.load("cifar10", tmp_path / "d")
    assert not marker.exists()
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:  # the same inside an archive
        tar.add(folder, arcname="cifar-10-batches-py")
    with pytest.raises(data.DataError, match=r"cifar-10-python\.tar\.gz:cifar-10-batches-py/test_batch asks"):
        data.load("cifar10", tmp_path / "cifar-10-python.tar.gz")
    assert not marker.exists()


def test_the_official_pickles_still_load(tmp_path):
    cifar_python_dir(tmp_path, n=8, test_labels=list(range(8)))
    a = data.load("cifar10", tmp_path)
    assert a.test_y.tolist() == list(range(8)) and a.train_x.shape == (40, 3, 32, 32)


@pytest.mark.parametrize("content", [b"", b"this is no archive at all" * 100])
def test_a_corrupt_archive_is_called_corrupt_not_missing(tmp_path, content):
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(content)
    for root in (bad, tmp_path):  # given itself, or found in its folder
        with pytest.raises(data.DataError, match="corrupt") as e:
            data.load("cifar10", root)
        assert str(bad) in str(e.value) and "not found" not in str(e.value)


def test_a_truncated_archive_is_called_corrupt(tmp_path):
    folder = cifar_python_dir(tmp_path / "src", n=8)
    good = tmp_path / "a" / "cifar-10-python.tar.gz"
    good.parent.mkdir()
    with tarfile.open(good, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    good.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(data.DataError, match="corrupt") as e:
        data.load("cifar10", good)
    assert str(good) in str(e.value)


def _interrupted(tmp_path, tiny, interrupt):
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    interrupt(spec, tmp_path / "cut", CPU)
    return spec, records.paths(tmp_path / "cut", spec.run_id)["ckpt"]


def _uninterrupted_curves(tmp_path, spec):
    run_one(spec, tmp_path / "ref", CPU, progress=False)
    return records.load(tmp_path / "ref")[1].drop(columns=["train_time_s", "img_per_s", "data_wait_s"])


def test_a_truncated_checkpoint_is_moved_aside_and_the_run_starts_over(tmp_path, tiny, interrupt):
    spec, ckpt = _interrupted(tmp_path, tiny, interrupt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a full disk, say
    with pytest.warns(UserWarning, match=r"is damaged.*moved it to .*\.pt\.corrupt.*from scratch"):
        row = run_one(spec, tmp_path / "cut", CPU, progress=False)
    assert row["status"] == "ok" and row["resumed_from"] == 0
    assert ckpt.with_name(ckpt.name + ".corrupt").exists() and not ckpt.exists()
    got = records.load(tmp_path / "cut")[1].drop(columns=["train_time_s", "img_per_s", "data_wait_s"])
    pd.testing.assert_frame_equal(got, _uninterrupted_curves(tmp_path, spec))


def test_only_a_complete_checkpoint_of_this_very_run_is_resumed(tmp_path, tiny):
    from bench.train import CHECKPOINT_KEYS, read_checkpoint

    spec, path = RunSpec("plain8", tiny, width=0.25), tmp_path / "ckpt" / "x.pt"
    path.parent.mkdir()
    assert read_checkpoint(path, spec, torch.device("cpu")) is None  # none yet: start from scratch
    full = {k: 0 for k in CHECKPOINT_KEYS} | {"spec": spec.to_json(), "model": {"w": torch.ones(2)}}
    aside = path.with_name("x.pt.corrupt")
    for partial in ({k: v for k, v in full.items() if k != "rng"}, list(full)):  # another program's .pt
        checkpoints.save_torch(partial, path)
        with pytest.warns(UserWarning, match=rf"^{path} is not a resbench checkpoint \(keys missing\); moved it to "
                                             rf"{aside} and training {spec.run_id} from scratch$"):
            assert read_checkpoint(path, spec, torch.device("cpu")) is None
        assert aside.exists() and not path.exists()
    checkpoints.save_torch(full, path)
    ck = read_checkpoint(path, spec, torch.device("meta"))  # lands on the device that resumes
    assert ck.keys() == CHECKPOINT_KEYS and ck["model"]["w"].device.type == "meta"
    with pytest.raises(RuntimeError, match=rf"^checkpoint {path} belongs to another spec; delete it to start over$"):
        read_checkpoint(path, RunSpec("plain8", tiny, width=0.5), torch.device("cpu"))
    assert path.exists()  # someone else's checkpoint is not ours to move


def test_a_crafted_checkpoint_is_refused_and_runs_nothing(tmp_path, tiny, interrupt):
    spec, ckpt = _interrupted(tmp_path, tiny, interrupt)
    marker = tmp_path / "pwned"
    ck = torch.load(ckpt, weights_only=True)
    torch.save(ck | {"curves": Marker(marker)}, ckpt)
    with pytest.warns(UserWarning, match="beyond tensors and plain containers.*refused"):
        row = run_one(spec, tmp_path / "cut", CPU, progress=False)
    assert not marker.exists() and row["resumed_from"] == 0 and row["status"] == "ok"


def test_checkpoints_and_weights_load_without_pickled_code(tmp_path, tiny, interrupt):
    spec, ckpt = _interrupted(tmp_path, tiny, interrupt)
    ck = torch.load(ckpt, weights_only=True)  # raises if anything beyond tensors and containers is inside
    assert RunSpec.from_dict(ck["spec"]) == spec and isinstance(ck["spec"], str)
    run_one(spec, tmp_path / "cut", CPU, progress=False)
    w = torch.load(records.paths(tmp_path / "cut", spec.run_id)["weights"], weights_only=True)
    assert RunSpec.from_dict(w["spec"]) == spec


@pytest.mark.slow  # over ~5 s on 2 cores: out of the fast loop
def test_an_unreadable_weights_file_costs_its_figure7_line_not_the_diagnosis_or_the_report(tmp_path, tiny, cifar_root):
    from bench.analysis import diagnose

    specs = [RunSpec(m, tiny, width=0.25) for m in ("plain8", "resnet8")]
    for s in specs:
        run_one(s, tmp_path / "r", CPU, data_root=cifar_root, progress=False)
    marker = tmp_path / "pwned"
    torch.save({"model": Marker(marker)}, records.paths(tmp_path / "r", specs[0].run_id)["weights"])
    notes = []
    diagnose(tmp_path / "r", records.load(tmp_path / "r")[0], data_root=cifar_root, lesion=False, shattered_=False,
             progress=False, notes=notes)
    assert not marker.exists() and any(specs[0].run_id in n and "refused" in n for n in notes)
    rep = build_report(tmp_path / "r")
    assert set(rep.tables["responses"]["run_id"]) == {specs[1].run_id}
    assert any(specs[0].run_id in n and "resbench diagnose" in n for n in rep.notes)
    assert "layer_responses" in rep.figures and "lacks 1 run" in (tmp_path / "r" / "report" / "report.md").read_text()


# -- which copy of the data -------------------------------------------------------------------------

def test_rows_say_which_copy_of_the_data_they_used(tmp_path, cifar_archive, tiny):
    archive = cifar_archive
    row = run_one(RunSpec("resnet8", tiny, width=0.25), tmp_path, CPU, data_root=archive, progress=False)
    # the shared copy is re-packed (no 'filenames' key), so its md5 is not the published one
    assert row["data_sha256"] == "1c96ab0b4af5f1d9b6d0c338c62d98d9a283019bb50f51b3175cabb4a29a0ec8"
    assert row["data_official"] is False and row["data_source"] == str(archive)


def test_fingerprint_covers_every_byte_and_checks_published_md5(tmp_path):
    folder = cifar_python_dir(tmp_path / "a", n=8)
    sha, official = data.fingerprint("pydir", folder)
    assert official is None  # no file of an extracted folder has a published md5
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:-1] + b"\x00")
    assert data.fingerprint("pydir", folder)[0] != sha
    fake = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    assert data.fingerprint("python10", fake)[1] is False  # named as the official archive, other bytes
    import hashlib

    assert data.fingerprint("python10", fake)[0] == hashlib.sha256(fake.read_bytes()).hexdigest()
