"""Data: find a data set, decode it once into a uint8 cache, and serve it from the training device.

Where data is looked for, in order: ``--data-root`` (a folder or an archive), else the environment
variable ``RESBENCH_DATA``, else torchvision's download into the cache folder when
``--download`` is given. Accepted layouts:

  cifar10   cifar-10-batches-py/ or cifar-10-python.tar.gz (the official "python version"),
            or an ImageFolder tree train/<class>/*.jpg|png + test/<class>/... (or a .tar.gz of one)
  cifar100  cifar-100-python/ or cifar-100-python.tar.gz
  fashion-mnist  the four IDX .gz files (Debian's dataset-fashion-mnist puts them in
            /usr/share/datasets/fashion-mnist, which is also searched)
  synthetic random images and labels of CIFAR-10's shape (no files; for tests and throughput)

The decoded arrays are cached (``RESBENCH_CACHE``, default ~/.cache/resbench) under a key made of
the source's path, size and modification time, so later runs start in about a second.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import re
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import DataError  # noqa: F401  (bench.data.DataError, as callers name it)
from resnet.group import member_major

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# the data sets and what they are before loading: one table (bench.datasets), read here and by the others
from bench.datasets import DATASETS, SHAPES, TABLE, TREES, cache_dir  # noqa: E402,F401
IMAGE_EXT = (".jpg", ".jpeg", ".png")
# The md5 sums the publishers give for their files (torchvision's download checks the same ones).
PUBLISHED_MD5 = {
    "cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
    "cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85",
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@dataclass
class Arrays:
    """A decoded data set: uint8 images (N, C, H, W) and int64 labels, on the CPU."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple[str, ...]
    source: str  # where it came from (a path, or "synthetic")
    sha256: str | None = None  # of the source's bytes (see fingerprint)
    official: bool | None = None  # its files match their publishers' md5 (None: no file has a published one)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def data_root(root: str | os.PathLike | None) -> Path | None:
    """The root the user gave: the option, else RESBENCH_DATA, else None."""
    root = root or os.environ.get("RESBENCH_DATA")
    return Path(root).expanduser() if root else None


def stem(dataset: str, model: str) -> str:
    """The stem a net gets on ``dataset``: ImageNet-style data (224 px) the paper's 7x7/2 + max-pool for the
    ImageNet-style family; everything else the 3x3 stem of 32 px inputs (the CIFAR family has no other)."""
    import resnet

    return "imagenet" if TABLE[dataset].streams and resnet.parse(model).family == "imagenet" else "cifar"


def check(dataset: str, root: str | os.PathLike | None = None, download: bool = False) -> None:
    """Find (and for CIFAR-like sets decode and cache) ``dataset``, or raise DataError: what a command does
    before it writes anything."""
    if TABLE[dataset].streams:
        load_tree(dataset, root, download)
    else:
        load(dataset, root, download)


def load_tree(dataset: str, root: str | os.PathLike | None = None, download: bool = False):
    """An ImageNet-style data set's images (bench.imagefolder.Tree): under ``root`` (or RESBENCH_DATA), a
    folder or archive with train/<class>/ and val/<class>/; Imagenette also by torchvision's download."""
    from bench import imagefolder

    base = data_root(root)
    fetchable = TABLE[dataset].torchvision  # Imagenette: torchvision downloads it; ImageNet: nobody does
    if fetchable and download and (base is None or not _has_tree(base)):
        import torchvision.datasets as tvd

        target = base or cache_dir() / "download"
        try:
            getattr(tvd, fetchable)(str(target), split="train", download=True)
        except Exception as e:  # network errors come in many types
            raise DataError(f"--download of imagenette into {target} failed ({e}); pass --data-root instead") from e
        base = target
    if base is None:
        raise DataError(f"{dataset} not found: no --data-root given and RESBENCH_DATA is not set. Fix: pass "
                        f"--data-root PATH, a folder (or .tar) with train/<class>/*.JPEG and val/<class>/*.JPEG"
                        + (", or add --download" if fetchable else ""))
    try:
        tree = imagefolder.scan(base)
    except imagefolder.ImageFolderError as e:
        raise DataError(f"{dataset}: {e}") from e
    want = SHAPES[dataset][1]
    if len(tree.classes) != want:
        raise DataError(f"{tree.root} holds {len(tree.classes)} classes; {dataset} has {want}")
    return tree


def _has_tree(base: Path) -> bool:
    return any((b / "train").is_dir() for b in (base, base / "imagenette2", base / "imagenette2-320",
                                                 base / "imagenette2-160"))


def load(dataset: str, root: str | os.PathLike | None = None, download: bool = False) -> Arrays:
    """Find, decode (once; then cached) and return a data set."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if TABLE[dataset].streams:
        raise DataError(f"{dataset} is decoded batch by batch, never held in memory: bench.data.load_tree reads it")
    if TABLE[dataset].layout == "synthetic":
        return synthetic()
    base = data_root(root)
    source = find(dataset, base)
    if source is None and download:
        source = _download(dataset, base or cache_dir() / "download")
    if source is None:
        raise DataError(_missing_message(dataset, base))
    return _cached(dataset, source)


def synthetic(n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> Arrays:
    """Images and labels of CIFAR-10's shape that a net can learn, without data files (tests, throughput runs):
    each class has a colour of its own; an image is its class's colour plus uniform noise, so a net learns the
    classes within a few steps, and a run on it trains or fails to as it would on real data."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 32, 32)
    colours = torch.randint(0, 256, (10, 3, 1, 1), generator=g).float()

    def images(y):
        noise = torch.randint(0, 256, (len(y), *shape), generator=g).float()
        return (0.75 * colours[y] + 0.25 * noise).round().to(torch.uint8)

    train_y, test_y = torch.randint(0, 10, (n_train,), generator=g), torch.randint(0, 10, (n_test,), generator=g)
    return Arrays(images(train_y), train_y, images(test_y), test_y, tuple(f"class{i}" for i in range(10)), "synthetic")


# -- finding ---------------------------------------------------------------------------------------

def _tar_kind(path: Path) -> str | None:
    """What a .tar.gz holds: 'python10', 'python100', 'folder' or None (by its member names only).

    Members are read one at a time and the first telling name decides: the official archives name
    their folder first, so this decompresses a few kB, not the whole archive, on every load.
    """
    try:
        with tarfile.open(path, "r:*") as tar:
            for i, member in enumerate(tar):
                name = member.name
                if "cifar-10-batches-py/" in name + "/":
                    return "python10"
                if "cifar-100-python/" in name + "/":
                    return "python100"
                if re.search(r"(^|/)train/[^/]+/[^/]+\.(jpe?g|png)$", name, re.I):
                    return "folder"
                if i > 200_000:
                    break
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); fetch it again, or point "
                        f"--data-root / RESBENCH_DATA at another copy") from e
    return None


def _source(dataset: str):
    """The module that handles a data set of a layout of its own (DataSet.module: bench.svhn), or None."""
    import importlib

    module = TABLE[dataset].module
    return importlib.import_module(module) if module else None


def find(dataset: str, base: Path | None) -> tuple[str, Path] | None:
    """(layout, path) of the first usable source under ``base``, or None."""
    src = _source(dataset)
    if src is not None:
        return src.find(base)
    if TABLE[dataset].layout == "idx":
        for folder in [p for p in (base, base / "fashion-mnist" if base else None, base / "FashionMNIST" / "raw" if base else None) if p] + [DEBIAN_FASHION]:
            if folder.is_dir() and all((folder / f).exists() for f in FASHION_FILES):
                return "idx", folder
        return None
    if base is None or not base.exists():
        return None
    entry = TABLE[dataset]
    py_dir, py_tar, kind, a_file = entry.python
    if base.is_file():
        found = _tar_kind(base)
        if found == kind or (found == "folder" and entry.small_tree):
            return found, base
        return None
    for cand in (base / py_dir, base):
        if (cand / a_file).exists() and cand.name == py_dir:
            return "pydir", cand
    if (base / py_tar).exists():
        return kind, base / py_tar
    if entry.small_tree:
        if (base / "train").is_dir() and (base / "test").is_dir():
            return "folderdir", base
        for tar in sorted(base.glob("*.tar.gz")) + sorted(base.glob("*.tgz")):
            found = _tar_kind(tar)
            if found in ("python10", "folder"):
                return found, tar
    return None


def _missing_message(dataset: str, base: Path | None) -> str:
    looked = f"under {base}" if base else "nowhere: no --data-root given and RESBENCH_DATA is not set"
    if TABLE[dataset].layout == "idx":
        looked += f" and in {DEBIAN_FASHION}"
        how = "apt-get install dataset-fashion-mnist, "
    else:
        how = ""
    return (
        f"{dataset} not found: looked {looked}. Fix: {how}pass --data-root PATH (a folder or archive "
        f"holding the official python-version files or an ImageFolder train/ + test/ tree), set "
        f"RESBENCH_DATA=PATH, or add --download to fetch it with torchvision."
    )


def _download(dataset: str, root: Path) -> tuple[str, Path] | None:
    import torchvision.datasets as tvd

    src = _source(dataset)
    cls = getattr(tvd, TABLE[dataset].torchvision)
    try:
        for kw in getattr(src, "DOWNLOADS", ({"train": True},)):  # a layout of its own says how torchvision fetches it
            cls(str(root), download=True, **kw)
    except Exception as e:  # network errors come in many types
        raise DataError(f"--download of {dataset} into {root} failed ({e}); pass --data-root or RESBENCH_DATA instead") from e
    return find(dataset, root)


# -- decoding --------------------------------------------------------------------------------------

def _cached(dataset: str, source: tuple[str, Path]) -> Arrays:
    layout, path = source
    st = path.stat()
    key = hashlib.sha1(f"{dataset}|{layout}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / f"{dataset}-{key}.pt"
    if cached.exists():
        try:
            d = torch.load(cached, weights_only=True)
            if "sha256" not in d:  # a cache entry of an earlier version
                d["sha256"], d["official"] = fingerprint(layout, path)
            return Arrays(d["train_x"], d["train_y"], d["test_x"], d["test_y"], tuple(d["classes"]), str(path),
                          d["sha256"], d["official"])
        except Exception:
            cached.unlink(missing_ok=True)  # a broken cache is rebuilt, never trusted
    try:
        arrays = _decode(dataset, layout, path)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"could not read {dataset} from {path}: {type(e).__name__}: {e}. The file may be corrupt or incomplete; fetch it again or point --data-root / RESBENCH_DATA elsewhere.") from e
    _check(arrays, dataset, path)
    arrays.sha256, arrays.official = fingerprint(layout, path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    torch.save({k: getattr(arrays, k) for k in ("train_x", "train_y", "test_x", "test_y", "sha256", "official")}
               | {"classes": list(arrays.classes)}, tmp)
    os.replace(tmp, cached)
    return arrays


def _source_files(layout: str, path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    own = next((d.module for d in TABLE.values() if d.layout == layout and d.module), None)
    if own is not None:  # a layout of its own: its module says which files
        import importlib

        return importlib.import_module(own).files(path)
    if layout == "idx":
        return [path / f for f in FASHION_FILES]
    if layout == "folderdir":
        return sorted(p for p in path.glob("*/*/*") if p.suffix.lower() in IMAGE_EXT)
    return sorted(p for p in path.iterdir() if p.is_file())  # an extracted python-version folder


def fingerprint(layout: str, path: Path) -> tuple[str, bool | None]:
    """(sha256, official) of a data source, computed once when it is decoded (then cached).

    sha256 covers the bytes of the source's files (and, for a folder, their names), so a row says
    exactly which copy it was trained on. ``official`` is True when every file that has a published
    md5 matches it, False when one does not (a re-packed copy: usable, and recorded as such), None
    where no file has a published md5 (an ImageFolder tree, say).
    """
    sha, verdicts = hashlib.sha256(), []
    for f in _source_files(layout, path):
        md5 = hashlib.md5()
        if f != path:
            sha.update(f.relative_to(path).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                sha.update(chunk)
                md5.update(chunk)
        published = PUBLISHED_MD5.get(f.name) or _module_md5(layout).get(f.name)
        if published:
            verdicts.append(md5.hexdigest() == published)
    return sha.hexdigest(), (all(verdicts) if verdicts else None)


def _module_md5(layout: str) -> dict:
    """A layout of its own's published md5 sums (its module's MD5), if it has any."""
    import importlib

    own = next((d.module for d in TABLE.values() if d.layout == layout and d.module), None)
    return getattr(importlib.import_module(own), "MD5", {}) if own else {}


def _check(a: Arrays, dataset: str, path: Path) -> None:
    classes = TABLE[dataset].classes
    problems = []
    if a.num_classes != classes:
        problems.append(f"{a.num_classes} classes instead of {classes}")
    for split, x, y in (("train", a.train_x, a.train_y), ("test", a.test_x, a.test_y)):
        if len(x) == 0 or len(x) != len(y):
            problems.append(f"{len(x)} {split} images with {len(y)} labels")
        elif int(y.min()) < 0 or int(y.max()) >= classes:
            problems.append(f"{split} labels outside 0..{classes - 1}")
    if problems:
        raise DataError(f"{path} does not look like {dataset}: {'; '.join(problems)}")


def _decode(dataset: str, layout: str, path: Path) -> Arrays:
    src = _source(dataset)
    if src is not None:  # numpy arrays and class names, as tensors
        d = src.decode(path)
        t = {k: torch.from_numpy(d[k]) for k in ("train_x", "train_y", "test_x", "test_y")}
        return Arrays(t["train_x"], t["train_y"].long(), t["test_x"], t["test_y"].long(), tuple(d["classes"]), str(path))
    if layout in ("python10", "python100", "pydir"):
        return _decode_python(dataset, path)
    if layout in ("folder", "folderdir"):
        return _decode_folder(path)
    return _decode_idx(path)


# What a CIFAR batch pickle may name: numpy's array reconstruction (numpy 1 and 2 spell the module
# differently) and bytes as Python 3 writes them at protocol 2. Nothing else is ever looked up, so
# a crafted "batch" whose pickle names os.system or any other callable is refused, not run.
PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def __init__(self, f, source: str):
        super().__init__(f, encoding="latin1")  # str keys for the Python-2 pickles and re-packed copies alike
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in PICKLE_ALLOWED:
            raise DataError(f"{self.source} asks to load {module}.{name}, which a CIFAR batch never holds; "
                            f"refusing it (the file may be crafted to run code). Use the official archive.")
        return super().find_class(module, name)


def _unpickle(f, source: str) -> dict:
    """A CIFAR batch: dicts, lists, strings and numpy arrays only (see PICKLE_ALLOWED)."""
    return _BatchUnpickler(f, source).load()


def _decode_python(dataset: str, path: Path) -> Arrays:
    ten = dataset == "cifar10"
    wanted = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"} if ten else {"train", "test", "meta"}
    blobs: dict[str, dict] = {}
    if path.is_dir():
        for name in sorted(n for n in wanted if (path / n).is_file()):  # what is missing is named below
            with open(path / name, "rb") as f:
                blobs[name] = _unpickle(f, str(path / name))
    else:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                base = m.name.rsplit("/", 1)[-1]
                if m.isfile() and base in wanted:
                    blobs[base] = _unpickle(tar.extractfile(m), f"{path}:{m.name}")
    missing = wanted - blobs.keys()
    if missing:
        raise DataError(f"{path} lacks {', '.join(sorted(missing))}: not a complete {dataset} python-version archive")

    def xy(names, label_key):
        x = np.concatenate([np.asarray(blobs[n]["data"], dtype=np.uint8) for n in names])
        y = np.concatenate([np.asarray(blobs[n][label_key], dtype=np.int64) for n in names])
        return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)

    if ten:
        tx, ty = xy([f"data_batch_{i}" for i in range(1, 6)], "labels")
        vx, vy = xy(["test_batch"], "labels")
        classes = tuple(blobs["batches.meta"]["label_names"])
    else:
        tx, ty = xy(["train"], "fine_labels")
        vx, vy = xy(["test"], "fine_labels")
        classes = tuple(blobs["meta"]["fine_label_names"])
    return Arrays(tx, ty, vx, vy, classes, str(path))


def _decode_folder(path: Path) -> Arrays:
    """An ImageFolder tree (a folder or a .tar.gz of one): split/class/image, sorted for determinism."""
    from PIL import Image

    files: dict[tuple[str, str, str], bytes | Path] = {}
    pat = re.compile(r"(?:^|/)(train|test)/([^/]+)/([^/]+\.(?:jpe?g|png))$", re.I)
    if path.is_dir():
        for p in path.glob("*/*/*"):
            m = pat.search(p.relative_to(path).as_posix())
            if m:
                files[m.groups()] = p
    else:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                m = pat.search(member.name)
                if m and member.isfile():
                    files[m.groups()] = tar.extractfile(member).read()
    classes = tuple(sorted({c for s, c, _ in files if s == "train"}))
    out = {}
    for split in ("train", "test"):
        keys = sorted(k for k in files if k[0] == split)
        if not keys:
            raise DataError(f"{path} has no {split}/<class>/*.jpg|png images")
        x = np.empty((len(keys), 32, 32, 3), dtype=np.uint8)
        for i, k in enumerate(keys):
            src = files[k]
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                x[i] = np.asarray(im.convert("RGB").resize((32, 32)) if im.size != (32, 32) else im.convert("RGB"))
        y = torch.tensor([classes.index(k[1]) for k in keys])
        out[split] = (torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y)
    return Arrays(*out["train"], *out["test"], classes, str(path))


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _decode_idx(folder: Path) -> Arrays:
    tx, ty, vx, vy = (_read_idx(folder / f) for f in FASHION_FILES)
    classes = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
    t = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    return Arrays(t(tx)[:, None], t(ty).long(), t(vx)[:, None], t(vy).long(), classes, str(folder))


# -- serving ---------------------------------------------------------------------------------------

def split(arrays: Arrays, val_size: int, train_size: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The deterministic train/val split (He et al. 2015: 45k/5k of the 50k training images).

    The permutation is fixed (seed 0), independent of the run's seed, so every run of a sweep
    validates on the same images. ``train_size`` takes the first images of the training part.
    """
    n = len(arrays.train_x)
    if val_size >= n:
        raise ValueError(f"val_size {val_size} leaves no training images (the set has {n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val, train = perm[:val_size], perm[val_size:]
    if train_size is not None:
        train = train[:train_size]
    return {
        "train": (arrays.train_x[train], arrays.train_y[train]),
        "val": (arrays.train_x[val], arrays.train_y[val]),
        "test": (arrays.test_x, arrays.test_y),
    }


class DeviceLoader:
    """The whole training set as uint8 on the device; batches are cut and augmented there.

    Augmentation (He et al. 2015, sec. 4.2): per-pixel mean subtracted (or the recipe's other ``Norm``), 4
    pixels of zero padding on each side, a random crop of the original size and a random horizontal flip,
    all as batched tensor ops. Every random choice of an epoch comes from a generator seeded by (seed,
    epoch), so batch ``i`` is a pure function of (seed, i): resuming needs only the iteration number, and
    the same seed gives the same batches on any device.

    With ``mixup`` = a > 0 (Zhang et al. 2018, as Fixup's CIFAR code uses it): batch ``i`` is mixed with a
    permutation of itself, x = lam x + (1 - lam) x[perm], lam ~ Beta(a, a), one per batch, both drawn from a
    generator seeded by (seed, i); its labels are then the mixed one-hot targets (B, classes), float.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean: "torch.Tensor | Norm", *, batch_size: int, seed: int,
                 device: torch.device, augment: bool = True, channels_last: bool = False, pad: int = 4,
                 rank: int = 0, world: int = 1, mixup: float = 0.0, num_classes: int | None = None):
        if len(x) < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(x)} images)")
        if batch_size % world:
            raise ValueError(f"the batch of {batch_size} images does not split over {world} processes")
        self.x, self.y = x.to(device), y.to(device)
        self.norm = as_norm(mean).to(device)
        self.mean = self.norm.mean  # (C, H, W) float, in [0, 1] units
        self.mixup, self.num_classes = mixup, num_classes if num_classes is not None else int(y.max()) + 1
        self.batch_size, self.seed, self.device = batch_size, seed, device
        # a data-parallel run: this process's share of each global batch (bench.ddp); together, the whole batch
        self.rank, self.world = rank, world
        self.augment, self.channels_last, self.pad = augment, channels_last, pad
        self.steps_per_epoch = len(x) // batch_size  # the last partial batch is dropped
        self._epoch, self._plan = -1, None

    def _epoch_plan(self, epoch: int):
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            n = len(self.x)
            perm = torch.randperm(n, generator=g)
            shift = torch.randint(0, 2 * self.pad + 1, (2, n), generator=g)
            flip = torch.rand(n, generator=g) < 0.5
            self._plan = tuple(t.to(self.device) for t in (perm, shift, flip))
            self._epoch = epoch
        return self._plan

    def close(self) -> None:  # as StreamLoader's; this loader holds no processes
        pass

    def batch(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``it`` (counting from 0 over the whole run)."""
        idx, shift, flip = self.plan(it)
        x, y = self.images(idx, shift, flip), self.y[idx]
        if self.mixup:
            x, y = self.mix(it, x, y)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    def mix(self, it: int, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mixup of batch ``it``: (mixed images, mixed one-hot targets (B, classes))."""
        rng = np.random.default_rng([self.seed, it, 0x6D6978])  # "mix": a stream of its own, seeded by (seed, it)
        lam = float(rng.beta(self.mixup, self.mixup))
        perm = torch.from_numpy(rng.permutation(len(x))).to(x.device)
        target = F.one_hot(y, self.num_classes).float()
        return x * lam + x[perm] * (1 - lam), target * lam + target[perm] * (1 - lam)

    def plan(self, it: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batch ``it``'s image indices (B,), crop offsets (2, B) and flips (B,): views, no copies."""
        epoch, i = divmod(it, self.steps_per_epoch)
        perm, shift, flip = self._epoch_plan(epoch)
        share = self.batch_size // self.world
        lo = i * self.batch_size + self.rank * share
        sl = slice(lo, lo + share)
        return perm[sl], shift[:, sl], flip[sl]

    def images(self, idx: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """The augmented, normalized images ``idx`` (any number), each flipped and cropped as planned."""
        x = self.norm.pixels(self.x[idx])
        if self.augment:
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            x = crop(x, shift[0], shift[1], self.pad)
        return self.norm.finish(x)


def group_batch(loaders: list[DeviceLoader], it: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch ``it`` of a run group: each member's own batch (its loader's seed), cut and augmented
    for all members at once, so a step's loader work is a handful of kernels whatever the group size.

    Returns images (B, K*C, H, W), member k in channels k*C..(k+1)*C-1 (resnet.stack's layout), and
    labels (B, K). Member k's images are exactly ``loaders[k].batch(it)``'s. The loaders must share
    one training set on the device (the same tensor) and its mean.
    """
    first = loaders[0]
    if any(l.x is not first.x or l.mean is not first.mean or l.norm.std is not first.norm.std
           or l.batch_size != first.batch_size for l in loaders):
        raise ValueError("a group's loaders must share one training set, mean and batch size")
    if any(l.mixup for l in loaders):
        raise ValueError("mixup runs train alone (bench.fuse.group_key)")
    plans = [l.plan(it) for l in loaders]
    idx = torch.cat([p[0] for p in plans])
    x = first.images(idx, torch.cat([p[1] for p in plans], 1), torch.cat([p[2] for p in plans]))
    k, b = len(loaders), first.batch_size
    x = member_major(x.reshape(k, b, *x.shape[1:]))
    if first.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, first.y[idx].reshape(k, b).T


def crop(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad by ``pad`` and take, per image, the window at offset (dy, dx) in the padded image."""
    b, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[bi, ci, rows, cols]


def pixel_mean(x: torch.Tensor) -> torch.Tensor:
    """The per-pixel mean image of a uint8 set, in [0, 1] units (He et al. 2015: 'per-pixel mean subtracted')."""
    return x.float().mean(0).div_(255)


@dataclass(frozen=True)
class Norm:
    """How uint8 images become a net's input (the recipe's ``normalize``, bench.specs.NORMALIZATIONS).

    ``pixels``: /255, minus ``mean`` (He et al.'s per-pixel mean image (C, H, W); a per-channel mean
    (C, 1, 1) when standardizing), over ``std`` (C, 1, 1) where given. Augmentation (flip, zero-padded crop)
    comes next, then ``finish``: with ``pln``, per-location normalisation (Martens et al. 2021, "Rapid
    training of deep neural networks without skip connections or normalization layers using Deep Kernel
    Shaping", sec. "Uniform q values via PLN"; dks's data_preprocessing, homog_mode "one"): a constant 1
    appended as one more channel, then each pixel's vector of C + 1 values scaled to mean square 1, so
    every location enters the net with q = 1 (the padding's zero pixels too, through the 1).
    """

    mean: torch.Tensor
    std: torch.Tensor | None = None
    pln: bool = False

    @classmethod
    def of(cls, how: str, train_x: torch.Tensor) -> "Norm":
        """The normalisation ``how`` with its statistics from the uint8 training images ``train_x`` (N, C, H, W)."""
        if how == "pixel-mean":
            return cls(pixel_mean(train_x))
        if how not in ("standardize", "pln"):
            raise ValueError(f"normalize must be pixel-mean, standardize or pln, got {how!r}")
        x = train_x.double().div(255).transpose(0, 1).flatten(1)  # (C, N*H*W), in double: the statistics exactly
        return cls(x.mean(1).float()[:, None, None], x.std(1, correction=0).float()[:, None, None], pln=how == "pln")

    def channels(self, image_channels: int) -> int:
        """The net's input channels for images of ``image_channels``."""
        return image_channels + self.pln

    def to(self, device) -> "Norm":
        if self.mean.device == torch.device(device):
            return self
        return Norm(self.mean.to(device), None if self.std is None else self.std.to(device), self.pln)

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float, before augmentation."""
        x = x.float().div_(255).sub_(self.mean)
        return x if self.std is None else x.div_(self.std)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """After augmentation: per-location normalisation with its homogeneous coordinate, where asked."""
        if not self.pln:
            return x
        x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        return x * x.pow(2).mean(1, keepdim=True).rsqrt()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the net's input, unaugmented (evaluation)."""
        return self.finish(self.pixels(x))


def as_norm(mean: "torch.Tensor | Norm") -> Norm:
    """A Norm, from a Norm or He et al.'s mean image (the form callers gave before the other normalisations)."""
    return mean if isinstance(mean, Norm) else Norm(mean)


def eval_batches(x: torch.Tensor, mean: "torch.Tensor | Norm", batch_size: int, device: torch.device,
                 channels_last: bool = False):
    """Yield normalized, un-augmented batches of ``x`` (already on ``device`` or moved per batch); ``mean``:
    a Norm, or the per-pixel mean image."""
    norm = as_norm(mean).to(device)
    for i in range(0, len(x), batch_size):
        xb = norm(x[i : i + batch_size].to(device, non_blocking=True))
        yield xb.contiguous(memory_format=torch.channels_last) if channels_last else xb
