"""Data: every accepted layout decodes, the cache is used, missing/corrupt data errors clearly."""
import gzip
import hashlib
import pickle
import re
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from bench import data
from tests.fakes import cifar_python_dir, idx_file


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's str (BINSTRING), as the official CIFAR batches hold their pixels."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def test_python2_pickles_keep_every_byte(tmp_path):
    """The official batches were pickled by Python 2: pixel bytes >= 128 survive only a latin-1 load."""
    folder = cifar_python_dir(tmp_path)
    x = np.arange(20 * 3072).reshape(20, 3072).astype(np.uint8)  # every byte value, 128..255 included
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "rb") as f:
            d = pickle.load(f)
        d["data"] = x
        with open(folder / name, "wb") as f:
            _Py2Pickler(f, protocol=2).dump(d)
    a = data.load("cifar10", tmp_path)
    assert torch.equal(a.test_x, torch.from_numpy(x).reshape(20, 3, 32, 32)) and a.source == str(folder)


def test_check_names_every_problem(tmp_path):
    def arrays(n_train=4, train_labels=(0, 1, 2, 9), n_test=1, test_labels=(0,), classes=10):
        return data.Arrays(torch.zeros(n_train, 3, 32, 32, dtype=torch.uint8), torch.tensor(train_labels),
                           torch.zeros(n_test, 3, 32, 32, dtype=torch.uint8), torch.tensor(test_labels, dtype=torch.int64),
                           tuple(map(str, range(classes))), "x")

    data._check(arrays(), "cifar10", tmp_path)  # one test image and labels up to 9 are fine
    bad = arrays(n_train=5, n_test=0, test_labels=(), classes=3)
    with pytest.raises(data.DataError) as e:
        data._check(bad, "cifar10", tmp_path / "d")
    assert str(e.value) == (f"{tmp_path / 'd'} does not look like cifar10: 3 classes instead of 10; "
                            f"5 train images with 4 labels; 0 test images with 0 labels")
    with pytest.raises(data.DataError, match=r": train labels outside 0\.\.9; test labels outside 0\.\.9$"):
        data._check(arrays(train_labels=(0, 1, 2, -1), test_labels=(10,)), "cifar10", tmp_path)
    with pytest.raises(data.DataError, match=r": train labels outside 0\.\.99$"):
        data._check(arrays(train_labels=(0, 1, 2, 100), classes=100), "cifar100", tmp_path)


def test_fingerprint_by_hand_for_each_layout(tmp_path, monkeypatch):
    def digest(root, files):
        sha = hashlib.sha256()
        for f in files:
            sha.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
        return sha.hexdigest()

    folder = cifar_python_dir(tmp_path / "py")
    assert data.fingerprint("pydir", folder) == (digest(folder, sorted(folder.iterdir())), None)
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    for name in data.FASHION_FILES:
        idx_file(fashion / name, np.zeros((2, 2)))
    (fashion / "notes.txt").write_text("not part of the data")
    assert data.fingerprint("idx", fashion)[0] == digest(fashion, [fashion / f for f in data.FASHION_FILES])
    tree = tmp_path / "tree"
    _image_folder(tree, per_class=1)
    Image.new("RGB", (32, 32)).save(tree / "train" / "cat" / "UPPER.PNG")
    (tree / "train" / "cat" / "notes.txt").write_text("not an image")
    images = sorted(p for p in tree.glob("*/*/*") if p.suffix in (".png", ".PNG"))
    assert len(images) == 21 and data.fingerprint("folderdir", tree) == (digest(tree, images), None)
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"some bytes")
    monkeypatch.setitem(data.PUBLISHED_MD5, "cifar-10-python.tar.gz", hashlib.md5(b"some bytes").hexdigest())
    assert data.fingerprint("python10", archive) == (hashlib.sha256(b"some bytes").hexdigest(), True)


def test_real_cifar10_archive_decodes_with_published_statistics(cifar_root):
    a = data.load("cifar10", cifar_root)
    assert a.train_x.shape == (50_000, 3, 32, 32) and a.train_x.dtype == torch.uint8
    assert a.test_x.shape == (10_000, 3, 32, 32)
    assert a.train_y[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert a.test_y[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    mean = a.train_x.float().mean((0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=1e-4)
    assert a.classes == data.CIFAR10_CLASSES
    # the second load comes from the cache, and is identical
    b = data.load("cifar10", cifar_root)
    assert torch.equal(a.train_x, b.train_x) and list(data.cache_dir().glob("cifar10-*.pt"))


def test_official_python_folder_and_its_tar(tmp_path):
    folder = cifar_python_dir(tmp_path / "dl")
    a = data.load("cifar10", tmp_path / "dl")
    assert a.train_x.shape == (100, 3, 32, 32) and a.test_x.shape == (20, 3, 32, 32)
    assert a.source == str(folder)
    (folder / "readme.html").write_text("<html>as in the official archive</html>")
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="copy/cifar-10-batches-py")  # a re-packed copy, one folder deeper
    b = data.load("cifar10", tmp_path / "cifar-10-python.tar.gz")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert b.source == str(tmp_path / "cifar-10-python.tar.gz")


def test_cifar100_python_layout(tmp_path):
    cifar_python_dir(tmp_path, classes=100, hundred=True)
    a = data.load("cifar100", tmp_path)
    assert a.num_classes == 100 and a.train_x.shape == (20, 3, 32, 32)


def _image_folder(root, per_class=2):
    for split in ("train", "test"):
        for ci, c in enumerate(data.CIFAR10_CLASSES):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (ci * 20, i * 50, 7)).save(d / f"{i:04d}.png")


def test_image_folder_tree_and_tar(tmp_path):
    _image_folder(tmp_path / "tree")
    a = data.load("cifar10", tmp_path / "tree")
    assert a.train_x.shape == (20, 3, 32, 32) and a.classes == data.CIFAR10_CLASSES
    assert a.train_y.tolist() == [c for c in range(10) for _ in range(2)]
    assert a.train_x[2, 0, 0, 0] == 20  # class 1 ("automobile"), red channel = 20, losslessly stored as PNG
    with tarfile.open(tmp_path / "jpeg-copy.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "tree" / "train", arcname="train")
        tar.add(tmp_path / "tree" / "test", arcname="test")
    (tmp_path / "archive").mkdir()
    (tmp_path / "jpeg-copy.tar.gz").rename(tmp_path / "archive" / "jpeg-copy.tar.gz")
    b = data.load("cifar10", tmp_path / "archive")  # found by content inside a folder
    assert torch.equal(a.train_x, b.train_x)


def test_image_folder_of_mixed_files(tmp_path):
    """What a hand-made tree holds: other sizes and modes, upper-case extensions, stray files, a class
    missing from the test split, fewer test images than training images."""
    tree = tmp_path / "tree"
    for split, per_class in (("train", 2), ("test", 1)):
        for ci, c in enumerate(data.CIFAR10_CLASSES[: 10 if split == "train" else 9]):  # no test trucks
            (tree / split / c).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (ci * 20, i * 50, 7)).save(tree / split / c / f"{i:04d}.png")
    Image.new("RGBA", (40, 40), (9, 99, 199, 128)).save(tree / "train" / "cat" / "big.PNG")  # resized, alpha dropped
    Image.new("L", (32, 32), 77).save(tree / "train" / "dog" / "grey.png")  # grey -> three equal channels
    (tree / "README.txt").write_text("not an image")
    with tarfile.open(tmp_path / "tree.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="tree")
    assert data.load("cifar10", tree).sha256 == data.fingerprint("folderdir", tree)[0]
    for root in (tree, tmp_path / "tree.tar.gz"):
        a = data.load("cifar10", root)
        assert a.classes == data.CIFAR10_CLASSES and a.source == str(root) and a.train_x.dtype == torch.uint8
        assert a.train_x.shape == (22, 3, 32, 32) and a.test_x.shape == (9, 3, 32, 32)
        assert a.test_y.tolist() == list(range(9)) and a.train_y.tolist().count(3) == 3  # cat: 2 + big.PNG
        cat = a.train_x[a.train_y == 3]
        assert (cat[2] == torch.tensor([9, 99, 199], dtype=torch.uint8)[:, None, None]).all()  # after 0000, 0001
        dog = a.train_x[a.train_y == 5]
        assert (dog[2] == 77).all()
    upper = tmp_path / "upper"  # a camera's names: IMG_0001.JPG
    for split in ("train", "test"):
        for c in data.CIFAR10_CLASSES:
            (upper / split / c).mkdir(parents=True)
            Image.new("RGB", (32, 32)).save(upper / split / c / "IMG_0001.JPG")
    with tarfile.open(tmp_path / "upper.tar.gz", "w:gz") as tar:
        tar.add(upper, arcname="upper")
    assert data.load("cifar10", tmp_path / "upper.tar.gz").train_x.shape == (10, 3, 32, 32)
    (tmp_path / "no-test" / "train" / "cat").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "no-test" / "train" / "cat" / "0.png")
    (tmp_path / "no-test" / "test").mkdir()
    with pytest.raises(data.DataError, match=r"no-test has no test/<class>/\*.jpg\|png images"):
        data.load("cifar10", tmp_path / "no-test")


def test_a_cifar100_archive_given_as_the_root(tmp_path):
    folder = cifar_python_dir(tmp_path / "src", classes=100, hundred=True)
    with tarfile.open(tmp_path / "c100.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-100-python")
    a = data.load("cifar100", tmp_path / "c100.tar.gz")
    assert a.num_classes == 100 and a.source == str(tmp_path / "c100.tar.gz")
    with pytest.raises(data.DataError, match="cifar10 not found"):  # a CIFAR-100 archive is not CIFAR-10
        data.load("cifar10", tmp_path / "c100.tar.gz")


def test_fashion_mnist_idx(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (30, 28, 28))
    y = rng.integers(0, 10, 30)
    for name, arr in zip(data.FASHION_FILES, (x, y, x[:10], y[:10])):
        idx_file(tmp_path / name, arr)
    a = data.load("fashion-mnist", tmp_path)
    assert (a.sha256, a.official) == data.fingerprint("idx", tmp_path)
    (tmp_path / "up" / "fashion-mnist").mkdir(parents=True)  # --data-root may name the folder above
    for name in data.FASHION_FILES:
        (tmp_path / name).rename(tmp_path / "up" / "fashion-mnist" / name)
    assert torch.equal(data.load("fashion-mnist", tmp_path / "up").train_x, a.train_x)
    assert a.train_x.shape == (30, 1, 28, 28) and a.image_shape == (1, 28, 28)
    assert torch.equal(a.train_x[:, 0], torch.from_numpy(x.astype(np.uint8)))
    assert torch.equal(a.test_x[:, 0], torch.from_numpy(x[:10].astype(np.uint8)))
    assert a.train_y.tolist() == y.tolist() and a.test_y.tolist() == y[:10].tolist() and a.train_y.dtype == torch.int64
    assert a.classes == tuple(torchvision.datasets.FashionMNIST.classes) and a.source == str(tmp_path)


@pytest.mark.parametrize("zero,dtype", [(1, 8), (0, 0x0D)])  # a stray first word; floats instead of bytes
def test_an_idx_file_of_other_than_unsigned_bytes_is_refused(tmp_path, zero, dtype):
    for name in data.FASHION_FILES:
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(struct.pack(">HBBI", zero, dtype, 1, 3) + bytes(12))
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte.gz is not an IDX file of unsigned bytes"):
        data.load("fashion-mnist", tmp_path)


def test_missing_data_names_places_and_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("RESBENCH_DATA", raising=False)
    with pytest.raises(data.DataError, match=r"not found: looked under .*--data-root.*RESBENCH_DATA.*--download"):
        data.load("cifar10", tmp_path)
    with pytest.raises(data.DataError, match=r"looked nowhere: no --data-root given and RESBENCH_DATA is not set\. "
                                             r"Fix: pass --data-root PATH"):
        data.load("cifar10")
    with pytest.raises(data.DataError, match=rf"fashion-mnist not found: looked under {tmp_path} and in "
                                             rf"{data.DEBIAN_FASHION}\. Fix: apt-get install dataset-fashion-mnist, pass"):
        data.load("fashion-mnist", tmp_path)


@pytest.mark.parametrize("dataset,cls", [("cifar10", "CIFAR10"), ("cifar100", "CIFAR100"), ("fashion-mnist", "FashionMNIST")])
def test_download_fetches_with_torchvision_into_the_root_or_the_cache(tmp_path, monkeypatch, dataset, cls):
    """torchvision's downloader, faked (no network here): it is asked for the training split of the
    right class into --data-root, else into the cache; what it fetched is then found and decoded."""
    calls = []

    def fetch(root, train, download):
        calls.append((root, train, download))
        if dataset == "fashion-mnist":  # where torchvision puts them
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True)
            for name in data.FASHION_FILES:
                idx_file(raw / name, np.zeros((10, 28, 28) if "images" in name else (10,)))
        else:
            cifar_python_dir(Path(root), classes=100 if dataset == "cifar100" else 10, hundred=dataset == "cifar100")

    monkeypatch.setattr(torchvision.datasets, cls, fetch)
    monkeypatch.setattr(data, "DEBIAN_FASHION", tmp_path / "no-debian-package")
    monkeypatch.delenv("RESBENCH_DATA", raising=False)
    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "cache"))  # this test's own: the fake writes there
    with pytest.raises(data.DataError, match="not found"):
        data.load(dataset, tmp_path / "root")
    assert calls == []  # only with download=True
    assert len(data.load(dataset, tmp_path / "root", download=True).train_x) in (10, 20, 100)
    assert calls == [(str(tmp_path / "root"), True, True)]
    data.load(dataset, download=True)
    assert calls[-1] == (str(data.cache_dir() / "download"), True, True)


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    def offline(root, train, download):
        raise OSError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(data.DataError, match=rf"^--download of cifar10 into {tmp_path} failed \(no route to host\); "
                                             r"pass --data-root or RESBENCH_DATA instead$"):
        data.load("cifar10", tmp_path, download=True)


def test_env_variable_is_used(tmp_path, monkeypatch):
    cifar_python_dir(tmp_path)
    monkeypatch.setenv("RESBENCH_DATA", str(tmp_path))
    assert len(data.load("cifar10").train_x) == 100


def test_corrupt_archive_is_a_clear_error(tmp_path):
    folder = cifar_python_dir(tmp_path / "src")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(data.DataError, match="could not read cifar10 .*corrupt"):
        data.load("cifar10", tmp_path / "src")
    (folder / "test_batch").unlink()
    (folder / "data_batch_2").unlink()
    with pytest.raises(data.DataError, match=rf"^{folder} lacks data_batch_2, test_batch: not a complete cifar10 "
                                             rf"python-version archive$"):
        data.load("cifar10", tmp_path / "src")


def test_truncated_tar_is_a_clear_error(tmp_path):
    folder = cifar_python_dir(tmp_path / "src")
    good = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    blob = good.read_bytes()
    good.write_bytes(blob[: len(blob) // 2])  # its first members still say what it holds; a batch is cut
    with pytest.raises(data.DataError, match=r"could not read cifar10 from .*: EOFError: .* corrupt or incomplete"):
        data.load("cifar10", good)
    good.write_bytes(blob[:20])  # not even its first member can be read
    with pytest.raises(data.DataError, match=r"cifar-10-python.tar.gz is corrupt or truncated \((ReadError|EOFError): "):
        data.load("cifar10", good)


def test_split_is_deterministic_and_disjoint(cifar_root):
    a = data.load("cifar10", cifar_root)
    s1, s2 = data.split(a, 5000), data.split(a, 5000)
    assert len(s1["train"][0]) == 45_000 and len(s1["val"][0]) == 5_000 and len(s1["test"][0]) == 10_000
    assert torch.equal(s1["val"][1], s2["val"][1])
    small = data.split(a, 5000, train_size=300)
    assert torch.equal(small["train"][0], s1["train"][0][:300])


def test_loader_batches_are_augmented_deterministic_and_mean_free():
    a = data.synthetic(512, 16)
    mean = data.pixel_mean(a.train_x)
    mk = lambda: data.DeviceLoader(a.train_x, a.train_y, mean, batch_size=64, seed=3, device=torch.device("cpu"))  # noqa: E731
    l1, l2 = mk(), mk()
    x1, y1 = l1.batch(9)  # epoch 1, batch 1
    x2, y2 = l2.batch(9)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (64, 3, 32, 32) and x1.dtype == torch.float32
    assert not torch.equal(l1.batch(0)[0], l1.batch(8)[0])  # a new epoch reshuffles
    plain = data.DeviceLoader(a.train_x, a.train_y, mean, batch_size=512, seed=0, device=torch.device("cpu"), augment=False)
    xb, _ = plain.batch(0)
    assert xb.mean().abs() < 1e-3  # per-pixel mean subtracted


def test_crop_pads_with_zeros_and_shifts():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    same = data.crop(x, torch.tensor([2]), torch.tensor([2]), 2)
    assert torch.equal(same, x)
    shifted = data.crop(x, torch.tensor([0]), torch.tensor([0]), 2)  # window moved up-left by 2
    assert shifted[0, 0, :2].abs().sum() == 0 and shifted[0, 0, 2, 2] == x[0, 0, 0, 0]


def _source_window(padded: torch.Tensor, out: torch.Tensor) -> list[tuple[int, int, bool]]:
    """Every (dy, dx, flipped) whose crop of the padded, normalised source image equals ``out``."""
    found = []
    for flipped in (False, True):
        src = padded.flip(2) if flipped else padded
        for dy in range(9):
            for dx in range(9):
                if torch.allclose(src[:, dy:dy + 32, dx:dx + 32], out, atol=1e-6):
                    found.append((dy, dx, flipped))
    return found


def test_loader_crops_flips_and_keeps_each_label_with_its_image():
    """Each output image is one random 32x32 window of its own source image (mean-subtracted, zero-padded
    by 4, maybe mirrored); labels travel with their images; an epoch shows every image once."""
    n, bs = 64, 16
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n)  # the label names the source image
    mean = data.pixel_mean(x)
    padded = torch.nn.functional.pad(x.float() / 255 - mean, (4, 4, 4, 4))
    loader = data.DeviceLoader(x, y, mean, batch_size=bs, seed=5, device=torch.device("cpu"))
    windows, labels = [], []
    for it in range(n // bs):  # one epoch
        xb, yb = loader.batch(it)
        _, shift, flip = loader.plan(it)
        for j, (img, label) in enumerate(zip(xb, yb.tolist())):
            found = _source_window(padded[label], img)
            assert len(found) == 1, f"image labelled {label} is not a window of source {label}"
            assert found[0] == (shift[0, j], shift[1, j], flip[j])  # rows by the first offset, as planned
            windows.append(found[0])
            labels.append(label)
    assert sorted(labels) == list(range(n))  # a permutation: every image once per epoch
    dys, dxs, flips = zip(*windows)
    assert len(set(dys)) >= 6 and len(set(dxs)) >= 6  # offsets spread over -4..4
    assert 0.25 < sum(flips) / n < 0.75  # about half mirrored
    assert labels[:bs] != sorted(labels[:bs])  # shuffled


def test_loader_subtracts_the_per_pixel_mean_pixel_by_pixel():
    x = torch.tensor([[[[0, 255], [51, 102]]], [[[255, 255], [153, 0]]]], dtype=torch.uint8)  # (2, 1, 2, 2)
    mean = data.pixel_mean(x)
    assert torch.allclose(mean, torch.tensor([[[0.5, 1.0], [0.4, 0.2]]]))
    loader = data.DeviceLoader(x, torch.tensor([0, 1]), mean, batch_size=2, seed=0, device=torch.device("cpu"),
                               augment=False)
    xb, yb = loader.batch(0)
    for img, label in zip(xb, yb):
        assert torch.allclose(img, x[label].float() / 255 - mean)
    assert torch.allclose(xb[yb.tolist().index(0)], torch.tensor([[[-0.5, 0.0], [-0.2, 0.2]]]))


def test_evaluation_batches_are_in_order_unaugmented_and_mean_free():
    x = torch.randint(0, 256, (5, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean = data.pixel_mean(x)
    batches = list(data.eval_batches(x, mean, 2, torch.device("cpu")))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert torch.allclose(torch.cat(batches), x.float() / 255 - mean)


def test_batches_are_channels_last_only_when_asked():
    x = torch.randint(0, 256, (4, 3, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    mean, cpu = data.pixel_mean(x), torch.device("cpu")
    nchw = lambda b: b.is_contiguous() and not b.is_contiguous(memory_format=torch.channels_last)  # noqa: E731
    nhwc = lambda b: b.is_contiguous(memory_format=torch.channels_last) and not b.is_contiguous()  # noqa: E731
    assert all(map(nchw, data.eval_batches(x, mean, 2, cpu)))
    assert all(map(nhwc, data.eval_batches(x, mean, 2, cpu, channels_last=True)))
    loader = lambda **k: data.DeviceLoader(x, torch.arange(4), mean, batch_size=2, seed=0, device=cpu, **k)  # noqa: E731
    assert nchw(loader().batch(0)[0]) and nhwc(loader(channels_last=True).batch(0)[0])


def test_loader_order_depends_on_seed_and_epoch():
    a = data.synthetic(256, 16)
    mean = data.pixel_mean(a.train_x)
    mk = lambda seed: data.DeviceLoader(a.train_x, a.train_y, mean, batch_size=64, seed=seed,  # noqa: E731
                                        device=torch.device("cpu"), augment=False)
    first = mk(0).batch(0)[1]
    assert not torch.equal(first, mk(1).batch(0)[1]) and not torch.equal(first, mk(0).batch(4)[1])
    assert torch.equal(first, mk(0).batch(0)[1])
    assert mk(0).steps_per_epoch == 4 and len(mk(0).batch(3)[1]) == 64


def test_batches_are_a_fixed_function_of_seed_and_step():
    """Batch i of seed s is the same in every version, so earlier records (the he2015 reference) can be
    reproduced: these plans were written down once. A change here must be deliberate, and said so."""
    a = data.synthetic(64, 8)
    loader = data.DeviceLoader(a.train_x, a.train_y, data.pixel_mean(a.train_x), batch_size=16, seed=3,
                               device=torch.device("cpu"))
    plans = {it: [t.tolist() for t in loader.plan(it)] for it in (0, 5)}  # step 5: the second epoch's second batch
    for it, (idx, shift, flip) in {0: ([48, 59, 40, 47, 16, 34], [[3, 1, 5, 4], [3, 2, 7, 2]], [1, 1, 0, 1, 1, 0]),
                                   5: ([25, 48, 12, 16, 5, 43], [[1, 1, 6, 5], [8, 4, 4, 7]], [0, 1, 1, 1, 0, 1])}.items():
        got_idx, got_shift, got_flip = plans[it]
        assert (got_idx[:6], [row[:4] for row in got_shift], got_flip[:6]) == (idx, shift, [bool(f) for f in flip])
    assert loader.plan(5)[0].tolist() == plans[5][0]  # asked again, after another epoch's plan
    # an epoch's plan is drawn once: its batches are views of it, not a fresh draw per step
    assert loader.plan(4)[0].untyped_storage().data_ptr() == loader.plan(7)[0].untyped_storage().data_ptr()


def test_split_and_loader_refuse_what_cannot_train():
    a = data.synthetic(64, 8)
    with pytest.raises(ValueError, match=r"^val_size 64 leaves no training images \(the set has 64\)$"):
        data.split(a, 64)
    parts = data.split(a, 63)
    assert len(parts["train"][0]) == 1 and len(parts["val"][0]) == 63
    with pytest.raises(ValueError, match=r"^batch size 2 is larger than the training set \(1 images\)$"):
        data.DeviceLoader(*parts["train"], a.train_x.float().mean(0), batch_size=2, seed=0, device=torch.device("cpu"))
    assert data.DeviceLoader(*parts["train"], a.train_x.float().mean(0), batch_size=1, seed=0,
                             device=torch.device("cpu")).steps_per_epoch == 1


def test_the_split_is_fixed_disjoint_and_train_size_takes_the_first_training_images():
    a = data.synthetic(64, 8)
    full, small = data.split(a, 10), data.split(a, 10, 20)
    val_imgs = {tuple(x.flatten().tolist()[:12]) for x in full["val"][0]}
    train_imgs = {tuple(x.flatten().tolist()[:12]) for x in full["train"][0]}
    assert len(val_imgs) == 10 and len(train_imgs) == 54 and not val_imgs & train_imgs  # all 64, each once
    assert torch.equal(small["val"][0], full["val"][0]) and torch.equal(small["train"][0], full["train"][0][:20])
    assert torch.equal(small["train"][1], full["train"][1][:20]) and torch.equal(full["test"][0], a.test_x)
    # shuffled by one permutation, written down once: every version validates on the same images
    assert torch.equal(full["val"][0], a.train_x[[44, 46, 17, 3, 47, 21, 35, 6, 33, 2]])
    torch.manual_seed(7)  # whatever seed the run set
    assert torch.equal(data.split(a, 10)["val"][0], full["val"][0])  # the same split every time


def test_a_cached_archive_is_not_decompressed_again(cifar_archive, monkeypatch):
    """Finding the (already decoded) official archive reads its first members, not all 180 MB."""
    import gzip

    archive = cifar_archive
    data.load("cifar10", archive)  # decoded and cached (or already cached)
    read = []
    real = gzip._GzipReader.read  # the decompressor: skipping a member (seek) goes through it too

    def counting(self, *args):
        out = real(self, *args)
        read.append(len(out))
        return out

    monkeypatch.setattr(gzip._GzipReader, "read", counting)
    a = data.load("cifar10", archive)
    assert len(a.train_x) == 50_000 and sum(read) < 2**20


def test_the_decoded_cache_its_place_name_and_upgrade(tmp_path, monkeypatch):
    """Decoded once into RESBENCH_CACHE (default ~/.cache/resbench) under a 16-hex key; a later load
    comes from it, source and fingerprint included, without reading the source again; an entry of an
    earlier version (no fingerprint) gets one."""
    monkeypatch.delenv("RESBENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.cache_dir() == tmp_path / "home" / ".cache" / "resbench"
    monkeypatch.setenv("RESBENCH_CACHE", str(tmp_path / "not" / "yet" / "cache"))  # made when first needed
    assert data.cache_dir() == tmp_path / "not" / "yet" / "cache"
    tree = tmp_path / "tree"
    _image_folder(tree, per_class=1)
    first = data.load("cifar10", tree)
    (entry,) = data.cache_dir().iterdir()
    assert re.fullmatch(r"cifar10-[0-9a-f]{16}\.pt", entry.name)
    real_fingerprint = data.fingerprint
    with monkeypatch.context() as m:
        m.setattr(data, "_decode", lambda *a: pytest.fail("decoded again instead of read from the cache"))
        m.setattr(data, "fingerprint", lambda *a: pytest.fail("the source read again on a cached load"))
        again = data.load("cifar10", tree)
    assert torch.equal(again.train_x, first.train_x) and again.source == str(tree) == first.source
    assert (again.sha256, again.official) == (first.sha256, first.official) == real_fingerprint("folderdir", tree)
    old = torch.load(entry, weights_only=True)
    del old["sha256"], old["official"]  # what an earlier version wrote
    torch.save(old, entry)
    monkeypatch.setattr(data, "_decode", lambda *a: pytest.fail("decoded again instead of upgraded"))
    upgraded = data.load("cifar10", tree)
    assert (upgraded.sha256, upgraded.official) == real_fingerprint("folderdir", tree)


def test_a_data_set_of_the_wrong_shape_names_its_place(tmp_path):
    _image_folder(tmp_path / "tree")
    for c in data.CIFAR10_CLASSES[3:]:
        for split in ("train", "test"):
            shutil.rmtree(tmp_path / "tree" / split / c)
    with pytest.raises(data.DataError, match=rf"^{tmp_path / 'tree'} does not look like cifar10: 3 classes instead of 10$"):
        data.load("cifar10", tmp_path / "tree")


def test_which_archive_a_folder_offers(tmp_path):
    """In a folder: the official archive by its name first (before other archives), CIFAR-100's by its
    name, any other .tar.gz or .tgz by what it holds, and a train/ without a test/ is no image tree."""
    py = cifar_python_dir(tmp_path / "src")
    c100 = cifar_python_dir(tmp_path / "src100", classes=100, hundred=True)

    def pack(path, folder, arcname):
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w:gz") as tar:
            tar.add(folder, arcname=arcname)
        return path

    _image_folder(tmp_path / "tree", per_class=1)
    both = tmp_path / "both"
    pack(both / "a-jpeg-copy.tar.gz", tmp_path / "tree", "")  # sorts before the official name
    official = pack(both / "cifar-10-python.tar.gz", py, "cifar-10-batches-py")
    assert data.find("cifar10", both) == ("python10", official)
    assert data.find("cifar100", pack(tmp_path / "h" / "cifar-100-python.tar.gz", c100, "cifar-100-python").parent) \
        == ("python100", tmp_path / "h" / "cifar-100-python.tar.gz")
    tgz = pack(tmp_path / "t" / "cifar.tgz", py, "cifar-10-batches-py")
    assert data.find("cifar10", tgz.parent) == ("python10", tgz)
    half = tmp_path / "half"
    (half / "train").mkdir(parents=True)  # a train/ folder of something else, beside a renamed archive
    copy = pack(half / "copy.tar.gz", py, "cifar-10-batches-py")
    assert data.find("cifar10", half) == ("python10", copy)


def test_synthetic_data_has_cifar10s_shape_and_classes_a_net_can_learn():
    a = data.synthetic()  # seed 0: the same images on every machine
    assert a.train_x.shape == (10_000, 3, 32, 32) and a.test_x.shape == (2_000, 3, 32, 32)
    assert a.train_x.dtype == a.test_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert a.train_y[:8].tolist() == [1, 2, 3, 0, 5, 5, 2, 9] and a.test_y[:4].tolist() == [6, 1, 6, 5]
    for x, y in ((a.train_x, a.train_y), (a.test_x, a.test_y)):
        assert (int(y.min()), int(y.max())) == (0, 9) and x.float().std() > 20  # noisy images, every class
    # learnable: the nearest class-mean colour of the training images names every test image's class
    means = torch.stack([a.train_x[a.train_y == c].float().mean((0, 2, 3)) for c in range(10)])
    nearest = torch.cdist(a.test_x.float().mean((2, 3)), means).argmin(1)
    assert (nearest == a.test_y).float().mean() > 0.99
    assert a.classes == tuple(f"class{i}" for i in range(10)) and a.source == "synthetic"
    assert not torch.equal(data.synthetic(seed=1).train_y, a.train_y)


def test_an_unknown_data_set_names_the_known_ones():
    with pytest.raises(data.DataError, match=r"^unknown dataset 'mnist'; choose one of cifar10, cifar100, "
                                             r"fashion-mnist, synthetic, imagenet, imagenette, svhn$"):
        data.load("mnist")
