"""The data sets resbench knows, one entry each: what a data set is before any file is read (its shape,
classes, size, layout, where torchvision fetches it). bench.data finds, decodes and serves the CIFAR-like
ones, bench.imagefolder the ImageFolder trees; specs, the cost estimate and the report read this table
only (no torch). Adding a data set of a known layout is one entry here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DataSet:
    name: str
    image_shape: tuple[int, int, int]  # (C, H, W) the nets see
    classes: int
    train_images: int  # as published, before a validation split: an epoch-based schedule's steps (bench.cost)
    layout: str  # "cifar-python" (the official python version) | "idx" | "tree" (ImageFolder) | "synthetic"
    # the official python version: (its folder, its archive, what bench.data calls such an archive, a file the
    # folder holds)
    python: tuple[str, str, str, str] | None = None
    torchvision: str | None = None  # the torchvision.datasets class that downloads it (--download)
    small_tree: bool = False  # also found as an ImageFolder train/ + test/ tree of its small images
    # a layout of its own: the module that finds and decodes it (``find(base)``, ``decode(path)``, ``files(path)``,
    # ``DOWNLOADS``: torchvision's arguments, ``MD5``; bench.data calls them), as bench.svhn; None: one bench.data knows
    module: str | None = None

    @classmethod
    def of(cls, module) -> "DataSet":
        """The data set a module of its own describes (NAME, IMAGE_SHAPE, CLASSES, TRAIN_IMAGES, LAYOUT,
        TORCHVISION) and handles (``DataSet.module``)."""
        return cls(module.NAME, module.IMAGE_SHAPE, module.CLASSES, module.TRAIN_IMAGES, module.LAYOUT,
                   torchvision=getattr(module, "TORCHVISION", None), module=module.__name__)

    @property
    def streams(self) -> bool:
        """Decoded batch by batch by worker processes (an ImageFolder tree), never held in memory."""
        return self.layout == "tree"

    @property
    def family(self) -> str:
        """The family of nets its images fit: "imagenet" (ResNet-18..152, 224 px) or "cifar" (6n+2 layers)."""
        return "imagenet" if self.streams else "cifar"


TABLE: dict[str, DataSet] = {}


def register(d: DataSet) -> DataSet:
    """Add a data set (once): bench.data then finds, downloads and decodes it, and every command takes it."""
    if d.name in TABLE and TABLE[d.name] is not d:
        raise ValueError(f"data set {d.name!r} is already registered")
    TABLE[d.name] = d
    return d


for _d in (
    DataSet("cifar10", (3, 32, 32), 10, 50_000, "cifar-python",
            python=("cifar-10-batches-py", "cifar-10-python.tar.gz", "python10", "data_batch_1"), torchvision="CIFAR10",
            small_tree=True),
    DataSet("cifar100", (3, 32, 32), 100, 50_000, "cifar-python",
            python=("cifar-100-python", "cifar-100-python.tar.gz", "python100", "train"), torchvision="CIFAR100"),
    DataSet("fashion-mnist", (1, 28, 28), 10, 60_000, "idx", torchvision="FashionMNIST"),
    DataSet("synthetic", (3, 32, 32), 10, 10_000, "synthetic"),  # no files: learnable random images (tests)
    DataSet("imagenet", (3, 224, 224), 1000, 1_281_167, "tree"),
    DataSet("imagenette", (3, 224, 224), 10, 9_469, "tree", torchvision="Imagenette"),
):
    register(_d)
from bench import svhn  # noqa: E402  (data sets of layouts of their own, each in a file of its own)

register(DataSet.of(svhn))

DATASETS = tuple(TABLE)
TREES = tuple(n for n, d in TABLE.items() if d.streams)  # decoded batch by batch, never held in memory
SHAPES = {n: (d.image_shape, d.classes) for n, d in TABLE.items()}  # (image shape, classes), before loading
TRAIN_IMAGES = {n: d.train_images for n, d in TABLE.items()}


def cache_dir() -> Path:
    """Where decoded data sets, tree listings and mean images are kept: RESBENCH_CACHE, else ~/.cache/resbench."""
    return Path(os.environ.get("RESBENCH_CACHE") or Path.home() / ".cache" / "resbench")
