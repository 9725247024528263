"""SVHN, a data set of its own layout added in one file (bench/svhn.py), on small files written in its format
(the real set cannot be downloaded on the machines resbench is developed on, and has not been trained here)."""
import numpy as np
import pytest
from click.testing import CliRunner

from bench import data, records
from bench.cli import main


def _mat(folder, n_train=96, n_test=48, seed=0):
    """train_32x32.mat and test_32x32.mat as the Stanford site writes them: X (32, 32, 3, N) uint8, y (N, 1) of
    1..10 (10: the digit 0)."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
        y = rng.integers(1, 11, (n, 1)).astype(np.uint8)
        colours = rng.integers(0, 256, (11, 3))  # learnable: a colour per label, plus noise
        x = (0.75 * colours[y[:, 0]][:, None, None, :] + 0.25 * rng.integers(0, 256, (n, 32, 32, 3))).astype(np.uint8)
        savemat(folder / name, {"X": np.transpose(x, (1, 2, 3, 0)), "y": y})
    return folder


def test_svhn_decodes_its_mat_files_with_the_digit_0_as_label_0(tmp_path, monkeypatch):
    from scipy.io import loadmat

    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "cache"))
    folder = _mat(tmp_path / "data" / "svhn")  # found in a svhn/ folder of the data root, too
    a = data.load("svhn", tmp_path / "data")
    raw = loadmat(folder / "train_32x32.mat")
    assert a.train_x.shape == (96, 3, 32, 32) and a.test_x.shape == (48, 3, 32, 32) and a.num_classes == 10
    # by hand: pixel (row 5, column 7), channel 2 of image 3; a label of 10 is the digit 0
    assert int(a.train_x[3, 2, 5, 7]) == int(raw["X"][5, 7, 2, 3])
    want = raw["y"][:, 0].astype(int)
    want[want == 10] = 0
    assert a.train_y.tolist() == want.tolist() and set(a.train_y.tolist()) <= set(range(10))
    assert a.official is False and len(a.sha256) == 64  # not the published files (their md5 differ)
    with pytest.raises(data.DataError, match="svhn not found"):
        data.load("svhn", tmp_path / "empty")


def test_a_smoke_sweep_trains_on_svhn_and_its_report_shows_it(tmp_path, monkeypatch):
    from bench.report import build_report

    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "cache"))
    root = _mat(tmp_path / "data")
    out = tmp_path / "s"
    res = CliRunner().invoke(main, ["sweep", "--preset", "smoke", "--dataset", "svhn", "--data-root", str(root),
                                    "--depths", "8", "--width", "0.25", "--iterations", "8", "--eval-every", "4",
                                    "--batch-size", "16", "--train-size", "48", "--val-size", "32", "--test-size",
                                    "32", "--out", str(out)])
    assert res.exit_code == 0, res.output
    runs = records.load(out)[0]
    assert set(runs["dataset"]) == {"svhn"} and (runs["status"] == "ok").all() and len(runs) == 2
    rep = build_report(out, tmp_path / "rep", responses=False)
    assert "training_curves" in rep.figures and len(rep.tables["final_errors"]) == 2
