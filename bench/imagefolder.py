"""ImageNet-style data (He et al. 2015, sec. 3.4): an ImageFolder tree, decoded batch by batch.

Layout: the one torchvision's references read, ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG``
(a folder, or a ``.tar``/``.tar.gz`` of one; Imagenette's ``imagenette2/`` after torchvision's
download has it). Classes are the sorted folder names of ``train/``, as torchvision's ImageFolder
numbers them. Unlike CIFAR, the decoded set does not fit in memory, so each batch is decoded as it
is needed: by worker processes (``decode_on="workers"``: torchvision.io's JPEG decoder, libjpeg-turbo,
PIL for other formats), or on the run's device (``decode_on="device"``: the workers only read the
files; the JPEGs of a batch are decoded in one call of ``torchvision.io.decode_jpeg`` on that device,
nvJPEG on CUDA, and augmented there), which frees the CPU cores a GPU would otherwise need to be fed.
The random choices are the same either way; the pixels agree exactly on the CPU and up to the
decoders' rounding on CUDA (nvJPEG's IDCT is not libjpeg-turbo's).

Training augmentation, the paper's: the shorter side resized to a random s in [256, 480], a random
224 x 224 crop, a random horizontal flip, the per-pixel mean subtracted (a mean image of the
training set, from ``MEAN_IMAGES`` images at the evaluation's scale); the colour augmentation of
Krizhevsky et al. (PCA lighting, std 0.1) as an option. Every random choice for image i of epoch
e is drawn from a generator seeded by (seed, e, i), so batch ``it`` of a run is a pure function of
(seed, it), also across a resume and across the processes of a data-parallel run.

Evaluation: the single centre crop (shorter side 256, centre 224 x 224), or the paper's standard
10-crop test (the four corner and the centre crops of that image and their mirrors; the ten
softmax outputs averaged).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import DataError

EXTENSIONS = (".jpeg", ".jpg", ".png")
DECODE_ON = ("workers", "device")  # where a training batch's JPEGs are decoded (see the module docstring)
JPEG_MAGIC = b"\xff\xd8\xff"
TRAIN_SCALES = (256, 480)  # the shorter side, drawn uniformly (He et al. sec. 3.4)
CROP = 224
EVAL_SCALE = 256
MEAN_IMAGES = 10_000
# Krizhevsky et al. 2012's PCA lighting on ImageNet (the eigenvalues and eigenvectors of the RGB covariance
# of the training pixels, in [0, 1] units, as torch/fb.resnet.torch states them)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))


class ImageFolderError(DataError):  # a data error: the CLI reports it in one line
    """The tree is missing, empty, or holds an image that cannot be decoded; the message names it."""


@dataclass(frozen=True)
class Item:
    path: str  # a file, or "archive::member"
    label: int


class Items:
    """A split's images: their paths (relative to ``root``, as bytes) and labels in two numpy arrays.

    ImageNet's 1.28M images as Item objects took 267 MiB in each process, and forked loader workers copy
    such objects page by page as reference counts change (~20 GB a node); two arrays are two objects.
    ``items[i]`` is an Item; ``items[a:b]``, ``items.take(indices)`` are Items; iterating yields Items.
    """

    def __init__(self, root: str, rel: np.ndarray, labels: np.ndarray, archive: bool = False,
                 spans: np.ndarray | None = None):
        self.root, self.rel, self.labels, self.archive = root, rel, labels, archive
        # an uncompressed tar's members: (offset of the data, size) each, from the scan (cached with it), so an image
        # is one pread of its bytes; tarfile's own lookup searched the member list (ms an image at 100k members)
        self.spans = spans

    def __len__(self) -> int:
        return len(self.rel)

    def path(self, i: int) -> str:
        rel = self.rel[i].decode()
        return f"{self.root}::{rel}" if self.archive else os.path.join(self.root, rel)

    def read(self, i: int) -> bytes:
        """Image i's file, as bytes: one pread from this process's own handle of an uncompressed tar (no shared
        file offset, whichever process opened it first), else the file (bench.imagefolder.read_bytes)."""
        if self.spans is None:
            return read_bytes(self.path(i))
        offset, size = (int(v) for v in self.spans[i])
        data = os.pread(_handle(self.root), size, offset)
        if len(data) != size:
            raise ImageFolderError(f"{self.path(i)}: the archive ends inside this member (truncated?)")
        return data

    def take(self, indices) -> "Items":
        idx = np.asarray(indices, dtype=np.int64)
        return Items(self.root, self.rel[idx], self.labels[idx], self.archive, None if self.spans is None else self.spans[idx])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Items(self.root, self.rel[i], self.labels[i], self.archive, None if self.spans is None else self.spans[i])
        return Item(self.path(i), int(self.labels[i]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __add__(self, other: "Items") -> "Items":
        if (other.root, other.archive) != (self.root, self.archive):
            raise ValueError("only Items of one tree join")
        spans = None if self.spans is None or other.spans is None else np.concatenate([self.spans, other.spans])
        return Items(self.root, np.concatenate([self.rel, other.rel]), np.concatenate([self.labels, other.labels]),
                     self.archive, spans)


_handles: dict[tuple[int, str], int] = {}  # (process, archive) -> its file descriptor: every worker opens its own


def _handle(archive: str) -> int:
    key = (os.getpid(), archive)
    if key not in _handles:
        _handles[key] = os.open(archive, os.O_RDONLY)
    return _handles[key]


@dataclass(frozen=True)
class Tree:
    """The images of one ImageFolder data set: (path, label) per split, the class names, where it came from."""

    root: str
    classes: tuple[str, ...]
    train: Items
    val: Items


def _items(root: str, rel: list[str], labels: list[int], archive: bool = False, spans=None) -> Items:
    return Items(root, np.array([r.encode() for r in rel], dtype=bytes), np.array(labels, dtype=np.int32), archive,
                 None if spans is None else np.array(spans, dtype=np.int64).reshape(-1, 2))


def scan(root: str | os.PathLike) -> Tree:
    """The train/ and val/ images under ``root`` (a folder, or an archive of one), sorted, labelled by class.
    Kept in the cache (``RESBENCH_CACHE``) under the tree's path and the modification times of its class
    folders (of the archive), so ImageNet's 1,000 folders are listed once, not by every process of every run."""
    root = Path(root)
    if root.is_file():
        return _cached_scan(root, [root], lambda: _scan_archive(root))
    base = next((b for b in (root, root / "imagenette2", root / "imagenette2-320", root / "imagenette2-160")
                 if (b / "train").is_dir()), None)
    if base is None:
        raise ImageFolderError(f"no train/<class>/ folders under {root}: an ImageNet-style data set is "
                               f"train/<class>/*.JPEG and val/<class>/*.JPEG")
    for split in ("train", "val"):
        if not (base / split).is_dir():
            raise ImageFolderError(f"{base} has train/ but no {split}/ folder")
    folders = [base / s for s in ("train", "val")] + [c for s in ("train", "val") for c in (base / s).iterdir()]
    return _cached_scan(base, folders, lambda: _scan_folder(base))


def _scan_folder(base: Path) -> Tree:
    classes = tuple(sorted(p.name for p in (base / "train").iterdir() if p.is_dir()))
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "val"):
        folder = base / split
        rel, labels = [], []
        for c in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if c not in index:
                raise ImageFolderError(f"{folder / c}: a class that train/ does not have")
            names = sorted(f for f in os.listdir(folder / c) if os.path.splitext(f)[1].lower() in EXTENSIONS)
            rel += [f"{split}/{c}/{f}" for f in names]
            labels += [index[c]] * len(names)
        if not rel:
            raise ImageFolderError(f"{folder} holds no images (*.JPEG, *.jpg, *.png)")
        splits[split] = _items(str(base), rel, labels)
    return Tree(str(base), classes, splits["train"], splits["val"])


def _stamp(root: Path, watched: list[Path]) -> str:
    """A key for what is known of a tree while none of ``watched`` (its class folders, or its archive) changed."""
    stamp = "\n".join(f"{p}|{p.stat().st_mtime_ns}" for p in sorted(watched))
    return hashlib.sha1(f"{root.resolve()}\n{stamp}".encode()).hexdigest()[:16]


def watched(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """(the tree's base, what its listing depends on): an archive itself; a folder's train/, val/ and class folders
    (adding or removing an image changes its class folder's modification time)."""
    root = Path(root)
    if root.is_file():
        return root, [root]
    folders = [root / s for s in ("train", "val")]
    return root, folders + [c for f in folders if f.is_dir() for c in f.iterdir()]


def cached(tree: Tree, name: str, compute) -> str:
    """``compute()`` (text) for ``tree``, kept in the cache while its listing holds (``watched``): ImageNet's 1.33M
    file sizes are stat'ed once, not at every start of every run while the other ranks wait."""
    from bench.datasets import cache_dir
    from bench.records import atomic_write

    path = cache_dir() / f"{name}-{_stamp(*watched(tree.root))}.txt"
    if path.exists():
        return path.read_text()
    value = compute()
    atomic_write(path, lambda tmp: tmp.write_text(value))
    return value


def _cached_scan(root: Path, watched: list[Path], scan_now) -> Tree:
    """``scan_now()``, or its result from the cache when none of ``watched`` changed since (adding or removing
    an image changes its class folder's modification time; an archive's own)."""
    from bench.datasets import cache_dir
    from bench.records import atomic_write

    key = _stamp(root, watched)
    path = cache_dir() / f"tree-{key}.npz"
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = z["meta"].tolist()  # root, archive flag, classes (one str per line)
                root_s, archive, *classes = meta
                split = {s: Items(root_s, z[f"{s}_rel"], z[f"{s}_labels"], archive == "archive",
                                  z[f"{s}_spans"] if f"{s}_spans" in z.files else None) for s in ("train", "val")}
            return Tree(root_s, tuple(classes), split["train"], split["val"])
        except (OSError, ValueError, KeyError):  # a damaged cache entry: scan again
            pass
    tree = scan_now()
    meta = np.array([tree.root, "archive" if tree.train.archive else "folder", *tree.classes])

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            spans = {f"{s}_spans": items.spans for s, items in (("train", tree.train), ("val", tree.val))
                     if items.spans is not None}
            np.savez(f, meta=meta, train_rel=tree.train.rel, train_labels=tree.train.labels, val_rel=tree.val.rel,
                     val_labels=tree.val.labels, **spans)

    atomic_write(path, write)
    return tree


def _scan_archive(path: Path) -> Tree:
    try:
        compressed = _compressed(path)
        with tarfile.open(path, "r:*") as tar:
            members = [m for m in tar if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ImageFolderError(f"{path} is not a readable tar archive ({type(e).__name__}: {e})") from e
    names = [m.name for m in members]
    # where each member's bytes lie: random access needs an uncompressed tar (a .tar.gz is read through)
    where = None if compressed else {m.name: (m.offset_data, m.size) for m in members}
    found: dict[str, dict[str, list[str]]] = {"train": {}, "val": {}}
    for name in names:
        parts = name.split("/")
        if len(parts) >= 3 and parts[-3] in found and parts[-1].lower().endswith(EXTENSIONS):
            found[parts[-3]].setdefault(parts[-2], []).append(name)
    if not found["train"] or not found["val"]:
        raise ImageFolderError(f"{path} holds no train/<class>/ and val/<class>/ images")
    classes = tuple(sorted(found["train"]))
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(found["val"]) - set(index))
    if missing:
        raise ImageFolderError(f"{path}: val/ classes that train/ does not have: {', '.join(missing)}")
    split = {}
    for s in found:
        rel = [n for c in sorted(found[s]) for n in sorted(found[s][c])]
        split[s] = _items(str(path), rel, [index[c] for c in sorted(found[s]) for _ in found[s][c]], archive=True,
                          spans=None if where is None else [where[n] for n in rel])
    return Tree(str(path), classes, split["train"], split["val"])


def _compressed(path: Path) -> bool:
    """Whether ``path`` is a compressed archive (gzip, bzip2, xz: no random access), by its first bytes."""
    with open(path, "rb") as f:
        head = f.read(6)
    return head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ"))


# -- decoding ---------------------------------------------------------------------------------------

_archives: dict[tuple[int, str], tarfile.TarFile] = {}  # per process: a forked worker never shares its parent's offset
LOADER_TIMEOUT_S = float(os.environ.get("RESBENCH_LOADER_TIMEOUT", "600"))  # a worker silent this long has stalled


def loader_options(workers: int) -> dict:
    """How every DataLoader of image files starts its workers: from a fork server, never by forking this
    (threaded) process, where a child can deadlock as it starts (CPython issue 112275, seen in a run here), and
    with a timeout, so a stalled worker becomes an error (``stalled``) instead of a hang of every rank."""
    return dict(num_workers=workers, multiprocessing_context="forkserver", timeout=LOADER_TIMEOUT_S) if workers else {}


def batches(loader):
    """A DataLoader's batches; its timeout (a stalled worker) raised as ``stalled`` says."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            err = stalled(e)
            if err is e:
                raise
            _shutdown(it)  # the stalled workers are ended now, not left behind
            raise err from e
        yield batch


def _shutdown(it) -> None:
    """End a DataLoader iterator's workers (those that do not stop when asked are terminated)."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def stalled(e: RuntimeError) -> Exception:
    """A DataLoader's timeout as the error a user can act on; other errors as they are."""
    if "timed out" not in str(e):
        return e
    return ImageFolderError(f"the image-decoding workers delivered nothing for {LOADER_TIMEOUT_S:g} s (a worker stalled: "
                            f"a hung file system or a deadlock); the run stops here and resumes from its checkpoint "
                            f"when rerun (RESBENCH_LOADER_TIMEOUT sets the limit)")


def read_bytes(path: str) -> bytes:
    if "::" in path:
        archive, member = path.split("::", 1)
        tar = _archives.get((os.getpid(), archive))
        if tar is None:
            tar = _archives[(os.getpid(), archive)] = tarfile.open(archive, "r:*")
        f = tar.extractfile(member)
        if f is None:
            raise ImageFolderError(f"{path}: not a file in the archive")
        return f.read()
    with open(path, "rb") as f:
        return f.read()


def decode(path: str) -> torch.Tensor:
    """The image at ``path`` as uint8 (3, H, W) RGB; ImageFolderError naming the file if it cannot be read."""
    return decode_data(read_bytes(path), path)


def _frombytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpeg(data, device="cpu"):
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 deprecates it for TorchCodec; 0.19-0.28 do not
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def decode_data(data: bytes, path: str) -> torch.Tensor:
    """``data`` (the bytes of the file at ``path``) as uint8 (3, H, W) RGB on the CPU."""
    try:
        if data[:3] == JPEG_MAGIC:  # JPEG: torchvision's decoder (libjpeg-turbo)
            return _decode_jpeg(_frombytes(data))
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(__import__("numpy").asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    except Exception as e:  # a corrupt file: name it (decoders raise many types)
        raise ImageFolderError(f"cannot decode {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"remove or replace the file") from e


def decode_many(datas, paths, device: torch.device) -> list[torch.Tensor]:
    """Each file's bytes as a uint8 (3, H, W) RGB image on ``device``: the JPEGs in one batched call of
    ``decode_jpeg`` there (nvJPEG on CUDA), the others by PIL on the CPU. A batch the device's decoder
    refuses is decoded image by image, each one it still refuses (nvJPEG lacks some JPEG variants, e.g.
    CMYK) on the CPU, so only a file no decoder reads stops the run, named."""
    jpegs = [i for i, d in enumerate(datas) if d[:3] == JPEG_MAGIC]
    if device.type == "cuda" and jpegs:
        # torchvision's CUDA decoder allocates its outputs on the caller's stream but decodes on a stream of its
        # own that does not wait for the caller's (pytorch/vision#9606): memory that queued kernels still read
        # (a training step launched without a host sync) could be written under them. Let them finish first.
        torch.cuda.current_stream(device).synchronize()
    try:
        on_device = _decode_jpeg([_frombytes(datas[i]) for i in jpegs], device) if jpegs else []
    except RuntimeError:  # one image it refuses fails the whole call
        on_device = []
        for i in jpegs:
            try:
                on_device.append(_decode_jpeg(_frombytes(datas[i]), device))
            except RuntimeError:
                on_device.append(None)
    out = dict(zip(jpegs, on_device))
    return [img if (img := out.get(i)) is not None else decode_data(d, p).to(device)  # the CPU's decoders
            for i, (d, p) in enumerate(zip(datas, paths))]


def resize_shorter(img: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (3, H, W) resized (bilinear, antialiased) so that its shorter side is ``side``."""
    _, h, w = img.shape
    scale = side / min(h, w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    if size == (h, w):
        return img
    if img.device.type == "cpu":  # torch's uint8 kernel: ~4x the float path on a CPU core, within 1 level of it
        return F.interpolate(img[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    out = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out[0].round_().clamp_(0, 255).to(torch.uint8)  # CUDA has no uint8 kernel for this


def image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of image ``index``'s random choices in ``epoch`` of run ``seed``."""
    key = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") & (2 ** 63 - 1))


def train_crop(img: torch.Tensor, g: torch.Generator, scales=TRAIN_SCALES, crop: int = CROP,
               lighting: bool = False) -> torch.Tensor:
    """The paper's training augmentation of one image (see the module docstring): uint8 (3, crop, crop)."""
    side = int(torch.randint(scales[0], scales[1] + 1, (1,), generator=g))
    img = resize_shorter(img, side)
    _, h, w = img.shape
    top = int(torch.randint(0, h - crop + 1, (1,), generator=g))
    left = int(torch.randint(0, w - crop + 1, (1,), generator=g))
    out = img[:, top:top + crop, left:left + crop]
    if bool(torch.rand(1, generator=g) < 0.5):
        out = out.flip(2)
    if lighting:
        alpha = torch.randn(3, generator=g) * 0.1
        shift = torch.tensor(PCA_EIGVEC) @ (alpha * torch.tensor(PCA_EIGVAL))  # per RGB channel, [0, 1] units
        out = (out.float() + 255 * shift.to(out.device)[:, None, None]).round_().clamp_(0, 255).to(torch.uint8)
    return out.contiguous()


def centre_crop(img: torch.Tensor, side: int = EVAL_SCALE, crop: int = CROP) -> torch.Tensor:
    img = resize_shorter(img, side)
    _, h, w = img.shape
    top, left = (h - crop) // 2, (w - crop) // 2
    return img[:, top:top + crop, left:left + crop].contiguous()


def ten_crops(img: torch.Tensor, side: int = EVAL_SCALE, crop: int = CROP) -> torch.Tensor:
    """(10, 3, crop, crop): the four corners and the centre of the image at ``side``, then their mirrors."""
    img = resize_shorter(img, side)
    _, h, w = img.shape
    corners = [(0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop), ((h - crop) // 2, (w - crop) // 2)]
    five = torch.stack([img[:, t:t + crop, l:l + crop] for t, l in corners])
    return torch.cat([five, five.flip(3)])


# -- datasets for worker processes -------------------------------------------------------------------

class TrainSet(torch.utils.data.Dataset):
    """Item i of ``order`` (a global position in epoch ``epoch``), augmented from its own generator."""

    def __init__(self, items, seed: int, lighting: bool = False):
        self.items, self.seed, self.lighting = items, seed, lighting

    def __len__(self):
        return len(self.items)

    def __getitem__(self, key):
        epoch, index = key  # the sampler hands (epoch, image index)
        img = decode_data(self.items.read(index), self.items.path(index))
        return self.augment(img, epoch, index), int(self.items.labels[index])

    def augment(self, img: torch.Tensor, epoch: int, index: int) -> torch.Tensor:
        """Image ``index`` of ``epoch``, decoded (on any device), augmented by its own generator."""
        return train_crop(img, image_generator(self.seed, epoch, index), lighting=self.lighting)


class RawSet(TrainSet):
    """TrainSet's items as the files' bytes, with their keys: for decoding on the device."""

    def __getitem__(self, key):
        epoch, index = key
        return self.items.read(index), int(self.items.labels[index]), epoch, index


def _as_columns(batch):  # a DataLoader collate: [(bytes, label, epoch, index), ...] -> four lists
    return tuple(map(list, zip(*batch)))


class EvalSet(torch.utils.data.Dataset):
    def __init__(self, items, ten: bool):
        self.items, self.ten = items, ten

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        img = decode_data(self.items.read(i), self.items.path(i))
        return (ten_crops(img) if self.ten else centre_crop(img)), int(self.items.labels[i])


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled image order of ``epoch`` (seeded by (seed, epoch), as the CIFAR loader's)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StreamLoader:
    """Batches of an ImageFolder training set, as DeviceLoader serves CIFAR: ``batch(it)`` is batch ``it``
    of the run (normalised, on the device), ``steps_per_epoch``. Worker processes decode ahead, in order.

    With ``world`` processes, process ``rank`` gets its share (images rank*b .. (rank+1)*b - 1) of each
    global batch of ``batch_size`` = world x b images: together, the batch a single process would train.
    ``decode_on="device"``: the workers read, ``device`` decodes and augments (the module docstring).
    """

    def __init__(self, items, mean: torch.Tensor, *, batch_size: int, seed: int, device: torch.device,
                 workers: int = 4, channels_last: bool = False, lighting: bool = False, rank: int = 0,
                 world: int = 1, decode_on: str = "workers"):
        if decode_on not in DECODE_ON:
            raise ValueError(f"decode_on must be one of {', '.join(DECODE_ON)}, got {decode_on!r}")
        if batch_size % world:
            raise ValueError(f"the batch of {batch_size} images does not split over {world} processes")
        if len(items) < batch_size:
            raise ValueError(f"batch size {batch_size} is larger than the training set ({len(items)} images)")
        self.items, self.mean, self.seed, self.device = items, mean.to(device), seed, device
        self.batch_size, self.local = batch_size, batch_size // world
        self.rank, self.world, self.workers, self.channels_last = rank, world, workers, channels_last
        self.decode_on = decode_on
        self.set = (TrainSet if decode_on == "workers" else RawSet)(items, seed, lighting)
        self.steps_per_epoch = len(items) // batch_size
        self._iter, self._next = None, None

    def _keys(self, start: int):
        """(epoch, image index) of this process's images from batch ``start`` on, forever. The epoch's order
        is drawn once per epoch (a permutation of ImageNet's 1.28M images takes milliseconds: drawn per batch,
        it alone capped a process near 4,300 img/s)."""
        it, drawn, order = start, None, None
        while True:
            epoch, i = divmod(it, self.steps_per_epoch)
            if epoch != drawn:
                order, drawn = epoch_order(len(self.items), self.seed, epoch).numpy(), epoch
            lo = i * self.batch_size + self.rank * self.local
            for index in order[lo: lo + self.local].tolist():
                yield epoch, index
            it += 1

    def close(self) -> None:
        """Stop the worker processes now (a dropped iterator stops them only when it is collected)."""
        _shutdown(self._iter)
        self._iter, self._next = None, None

    def _start(self, it: int) -> None:
        self.close()  # the previous workers' prefetched batches are of the wrong steps
        sampler = _Keys(self._keys(it))
        raw = self.decode_on == "device"
        self._iter = iter(torch.utils.data.DataLoader(self.set, batch_size=self.local, sampler=sampler,
                                                      collate_fn=_as_columns if raw else None,
                                                      pin_memory=self.device.type == "cuda" and not raw,
                                                      persistent_workers=False, prefetch_factor=4 if self.workers else None,
                                                      **loader_options(self.workers)))
        self._next = it

    def batch(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._iter is None or it != self._next:
            self._start(it)
        try:
            x, y = self._decoded(*next(self._iter)) if self.decode_on == "device" else next(self._iter)
        except RuntimeError as e:
            err = stalled(e)
            if err is e:
                raise
            self.close()  # the stalled workers are ended now, not left behind
            raise err from e
        self._next = it + 1
        x = x.to(self.device, non_blocking=True).float().div_(255).sub_(self.mean)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y.to(self.device, non_blocking=True)

    def _decoded(self, datas, labels, epochs, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """A read batch decoded and augmented on the device, each image by its own generator (as TrainSet)."""
        imgs = decode_many(datas, [self.items[i].path for i in indices], self.device)
        return torch.stack([self.set.augment(img, e, i) for img, e, i in zip(imgs, epochs, indices)]), torch.tensor(labels)


class _Keys(torch.utils.data.Sampler):
    """An endless sampler over precomputed keys (a generator of (epoch, index))."""

    def __init__(self, keys):
        self.keys = keys

    def __iter__(self):
        return self.keys

    def __len__(self):  # endless: the trainer stops it
        return 2 ** 62


class _CheckSet(torch.utils.data.Dataset):
    """Each file of a split decoded once: (index, '' or why it cannot be decoded)."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            decode_data(self.items.read(i), self.items.path(i))
            return i, ""
        except (ImageFolderError, OSError) as e:
            return i, str(e)


def _rows(rows):  # a DataLoader collate that keeps the rows (a function: a fork server's workers unpickle it)
    return rows


def check_files(tree: Tree, workers: int = 4, progress: bool = False) -> list[tuple[str, str]]:
    """(path, why) of every image of ``tree`` (train/ and val/) that cannot be read and decoded, each file
    decoded once by ``workers`` processes: what a run would stop at, found before it starts."""
    from tqdm.auto import tqdm

    bad = []
    for items in (tree.train, tree.val):
        loader = torch.utils.data.DataLoader(_CheckSet(items), batch_size=64, collate_fn=_rows, **loader_options(workers))
        for rows in tqdm(loader, desc="check", unit="batch", disable=None if progress else True, leave=False):
            bad += [(items.path(i), why) for i, why in rows if why]
    return bad


def mean_image(items, images: int = MEAN_IMAGES, workers: int = 4) -> torch.Tensor:
    """The per-pixel mean (3, 224, 224), in [0, 1] units, of the first ``images`` training images (an evenly
    spaced sample of the tree), each at the evaluation's scale and centre crop."""
    step = max(1, len(items) // images)
    sample = items[::step][:images]
    loader = torch.utils.data.DataLoader(EvalSet(sample, ten=False), batch_size=64, **loader_options(workers))
    total, n = torch.zeros(3, CROP, CROP, dtype=torch.float64), 0
    for x, _ in loader:
        total += x.double().sum(0)
        n += len(x)
    return (total / n / 255).float()


# -- a run's sets of a tree ---------------------------------------------------------------------

def tree_sets(tree, r) -> dict:
    """An ImageNet-style tree's train, val and test items (bench.imagefolder.Items) under recipe ``r``: the val
    images held out of train/ by a fixed permutation, the test images the first of val/ (what a run trains and
    is tested on)."""
    perm = torch.randperm(len(tree.train), generator=torch.Generator().manual_seed(0)).numpy()
    held, kept = perm[: r.val_size], perm[r.val_size:]
    return dict(train=tree.train.take(kept)[: r.train_size], val=tree.train.take(held), test=tree.val[: r.test_size])


def tree_mean(tree, items, workers: int = 4) -> torch.Tensor:
    """The training set's per-pixel mean image (mean_image, decoded by ``workers`` processes),
    cached by the tree's list of files. In a data-parallel run rank 0 computes (or reads) it and sends it to the
    others, wherever they run (a node-local cache on another node does not hold rank 0's file)."""
    from bench import ddp
    from bench.checkpoints import save_torch
    from bench.datasets import cache_dir

    if not ddp.place().main:  # rank 0's mean, sent: another node's cache may not hold its file
        return ddp.from_main(None)
    key = hashlib.sha1(b"\n".join([tree.root.encode(), *items.rel.tolist()])).hexdigest()[:16]
    path = cache_dir() / f"mean-{key}-{MEAN_IMAGES}.pt"
    if not path.exists():
        save_torch(mean_image(items, workers=workers), path)
    return ddp.from_main(torch.load(path, weights_only=True))


def write_sample(images: torch.Tensor, labels: torch.Tensor, classes, out: str | os.PathLike, *, size=(375, 500),
                 quality: int = 90, val_every: int = 10) -> Tree:
    """A tree of ImageNet-sized JPEGs (``size``, ImageNet's typical 500 x 375) from small images (CIFAR's,
    upscaled): to try the ImageNet-style path and time its decoding without ImageNet. Every
    ``val_every``-th image goes to val/."""
    from PIL import Image

    out = Path(out)
    for i, (img, y) in enumerate(zip(images, labels.tolist())):
        split = "val" if i % val_every == 0 else "train"
        folder = out / split / str(classes[y])
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size[1], size[0]), Image.BICUBIC)
        big.save(folder / f"{i:07d}.JPEG", format="JPEG", quality=quality)
    return scan(out)
