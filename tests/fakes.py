"""Tiny data sets in the official on-disk layouts, made by hand for tests that must not need the real ones."""
import gzip
import pickle
import struct

import numpy as np

from bench import data


def cifar_python_dir(root, n=20, classes=10, hundred=False, test_labels=None):
    """A CIFAR-10 (or, with ``hundred``, CIFAR-100) folder in the official python layout: Python-2-style
    pickles with 'filenames', ``n`` random images a batch. ``test_labels`` replaces the test batch's
    labels (any object: a test can plant a crafted pickle there)."""
    rng = np.random.default_rng(0)
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"

    def batch(name, label, test=False):
        d = {"batch_label": label, key: rng.integers(0, classes, n).tolist(),
             "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "filenames": [f"{i}.png" for i in range(n)]}
        if test and test_labels is not None:
            d[key] = test_labels
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)

    if hundred:
        batch("train", "train")
        batch("test", "test", test=True)
        with open(folder / "meta", "wb") as f:
            pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f, protocol=2)
    else:
        for i in range(1, 6):
            batch(f"data_batch_{i}", f"training batch {i} of 5")
        batch("test_batch", "testing batch 1 of 1", test=True)
        with open(folder / "batches.meta", "wb") as f:
            pickle.dump({"label_names": list(data.CIFAR10_CLASSES), "num_vis": 3072}, f, protocol=2)
    return folder


def idx_file(path, arr):
    """``arr`` as a gzipped IDX file (Fashion-MNIST's format), uint8."""
    header = struct.pack(">HBB", 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


class Stalling:
    """A dataset whose items never come (a worker stuck on a hung file system): for the loaders' timeout."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        import time

        time.sleep(3600)
