"""SVHN (Netzer et al. 2011, "Reading Digits in Natural Images with Unsupervised Feature Learning"): house
numbers cropped to 32 x 32 RGB, 73,257 training and 26,032 test images of ten digits, as the Stanford site
publishes them (``train_32x32.mat``, ``test_32x32.mat``: MATLAB files, images (32, 32, 3, N) and labels 1..10,
10 for the digit 0, which torchvision maps to 0 as here). A data set of its own layout, registered in this
one file (bench.datasets registers it, from the constants below: one line there); bench.data finds, downloads,
decodes and caches it through the functions below. Its "extra" split (531k easier images) is not used.

Imports no torch (bench.datasets, the reader side's table, registers it).
"""
from __future__ import annotations

from pathlib import Path

from bench.errors import DataError

# what the set is (bench.datasets registers it from these: DataSet.of)
NAME, IMAGE_SHAPE, CLASSES, TRAIN_IMAGES, LAYOUT, TORCHVISION = "svhn", (3, 32, 32), 10, 73_257, "svhn-mat", "SVHN"
FILES = ("train_32x32.mat", "test_32x32.mat")
DOWNLOADS = ({"split": "train"}, {"split": "test"})  # torchvision's SVHN (which checks the md5 below), once each
# the md5 sums torchvision's SVHN checks its downloads against (torchvision.datasets.SVHN.split_list)
MD5 = {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373", "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"}


def find(base: Path | None) -> tuple[str, Path] | None:
    """(layout, folder) of the two .mat files under ``base`` (itself, or its svhn/ or SVHN/ folder), or None."""
    for folder in (base, base / "svhn", base / "SVHN") if base is not None else ():
        if folder.is_dir() and all((folder / f).is_file() for f in FILES):
            return LAYOUT, folder
    return None


def files(folder: Path) -> list[Path]:
    """The files whose bytes a run's data fingerprint covers."""
    return [folder / f for f in FILES]


def decode(folder: Path) -> dict:
    """The training and test images as uint8 numpy arrays (N, 3, 32, 32), labels 0..9 (the file's 10 is the
    digit 0), and the class names; bench.data makes them tensors."""
    import numpy as np
    from scipy.io import loadmat

    out = {}
    for split, name in zip(("train", "test"), FILES):
        try:
            mat = loadmat(folder / name)
            x, y = mat["X"], mat["y"].astype(np.int64).reshape(-1)
        except (ValueError, KeyError, OSError, NotImplementedError) as e:
            raise DataError(f"{folder / name} is not an SVHN .mat file ({type(e).__name__}: {e})") from e
        if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.shape[3] != len(y):
            raise DataError(f"{folder / name}: images of shape {x.shape} with {len(y)} labels; SVHN's are (32, 32, 3, N)")
        y[y == 10] = 0
        # (H, W, C, N) -> (N, C, H, W), as torchvision's SVHN does
        out[f"{split}_x"] = np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1)), dtype=np.uint8)
        out[f"{split}_y"] = y
    return out | dict(classes=tuple(str(d) for d in range(10)))
