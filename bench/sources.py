"""What a run trains and is evaluated on, as the trainer sees it: a data set's splits, its input normalisation,
training loaders (one per member of a group, seeded by its run) and evaluation. ``load`` picks the source a data
set needs (bench.datasets): ``Held``, a CIFAR-like set held on the device (bench.data), or ``Streamed``, an
ImageFolder tree decoded batch by batch by worker processes (bench.imagefolder). The trainer (bench.train) asks
only for what ``Source`` lists.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from bench import data, ddp
from bench.fuse import Members
from bench.imagefolder import tree_mean, tree_sets
from bench.specs import Execution, RunSpec
from bench.steps import autocast


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, ex: Execution, device,
             members: Members | None = None) -> list[float]:
    """Top-1 error (fraction) of each member on un-augmented images, with large batches.

    ``members`` None: ``model`` is one network and the list has one entry.
    """
    k = members.k if members else 1
    if len(x) == 0:
        return [float("nan")] * k
    total = len(x)
    place = ddp.place()
    if ddp.active():  # each rank its share of the images, each image once; the counts are summed
        x, y = x[place.rank::place.world], y[place.rank::place.world]
    model.eval()
    wrong = torch.zeros(k, device=device, dtype=torch.long)
    y = y.to(device)
    for i, xb in enumerate(data.eval_batches(x, mean, ex.eval_batch_size, device, ex.channels_last)):
        yb = y[i * ex.eval_batch_size : i * ex.eval_batch_size + len(xb)]
        with autocast(ex.amp, device):
            logits = model(members.eval_input(xb, ex.channels_last) if members else xb)
        if logits.dim() == 2:
            logits = logits[:, None]  # one network: a group of one
        wrong += (logits.argmax(2) != yb[:, None]).sum(0)
    model.train()
    return [w / total for w in ddp.all_sum(wrong).tolist()]


class Held:
    """What every member of a group trains and is evaluated on (one split: it does not depend on the seed):
    a CIFAR-like data set held on the device (bench.data). Streamed serves ImageNet-style sets the same way."""

    loader = "device-loader"  # how training batches are made, in each row's train_path
    decode_on = None  # the set sits decoded in memory

    def __init__(self, arrays: data.Arrays, r, device: torch.device):
        parts = data.split(arrays, r.val_size, r.train_size)
        # the input's normalisation (the recipe's), its statistics from the training split
        self.arrays, self.train, self.mean = arrays, parts["train"], data.Norm.of(r.normalize, parts["train"][0])
        # evaluation sets live on the device too: no host-to-device copies at evaluation points
        self.sets = dict(val=tuple(t.to(device) for t in parts["val"]),
                         test=tuple(t[: r.test_size].to(device) for t in parts["test"]))
        self.num_classes, self.image_shape = arrays.num_classes, arrays.image_shape
        self.in_channels = self.mean.channels(self.image_shape[0])  # the net's: one more under PLN
        self.source, self.sha256, self.official = arrays.source, arrays.sha256, arrays.official

    def loaders(self, specs: list[RunSpec], ex: Execution, device: torch.device, place: ddp.Place) -> list:
        # one copy of the training set on the device, shared by every member's loader (seeded by its run)
        train_x, train_y = (t.to(device) for t in self.train)
        norm = self.mean.to(device)
        return [data.DeviceLoader(train_x, train_y, norm, batch_size=s.recipe.batch_size, seed=s.seed, device=device,
                                  channels_last=ex.channels_last, rank=place.rank, world=place.world,
                                  mixup=s.recipe.mixup, num_classes=self.num_classes) for s in specs]

    @staticmethod
    def batch(loaders: list, it: int):
        return loaders[0].batch(it) if len(loaders) == 1 else data.group_batch(loaders, it)

    def evaluate(self, model, split: str, ex: Execution, device, members) -> list[float]:
        return evaluate(model, *self.sets[split], self.mean, ex, device, members)

    def final(self, model, ex: Execution, device, recipe) -> dict:
        return {}


class Streamed:
    """An ImageNet-style data set (bench.imagefolder): training batches decoded by worker processes,
    evaluation on the centre crop, and the paper's 10-crop test at the end where the recipe asks for it.
    The test set is the tree's val/ (as the paper reports ImageNet's val error); --val-size N holds N
    training images out for validation (a fixed permutation, as for CIFAR)."""

    loader = "stream-loader"

    def __init__(self, tree, r, device: torch.device, ex: Execution):
        from bench import imagefolder as imf

        self.imf, self.tree = imf, tree
        sets = tree_sets(tree, r)
        self.train, self.sets = sets.pop("train"), sets
        self.mean = tree_mean(tree, self.train, workers=ex.loader_workers)
        self.num_classes, self.image_shape = len(tree.classes), (3, imf.CROP, imf.CROP)
        self.in_channels = 3
        # rank 0 writes the records: the others need no fingerprint (a stat per file)
        self.source, self.official = tree.root, None
        self.sha256 = imf.cached(tree, "fingerprint", lambda: tree_fingerprint(tree)) if ddp.place().main else None
        self.workers, self.decode_on = ex.loader_workers, ex.decode_on

    def loaders(self, specs: list[RunSpec], ex: Execution, device: torch.device, place: ddp.Place) -> list:
        if len(specs) != 1:
            raise ValueError("ImageNet-style runs train alone (run groups hold CIFAR nets only)")
        s = specs[0]
        return [self.imf.StreamLoader(self.train, self.mean, batch_size=s.recipe.batch_size, seed=s.seed, device=device,
                                      workers=self.workers, channels_last=ex.channels_last, lighting=s.recipe.lighting,
                                      rank=place.rank, world=place.world, decode_on=self.decode_on)]

    batch = staticmethod(Held.batch)  # one loader: its batch

    @torch.no_grad()
    def _error(self, model, items, ex: Execution, device, ten: bool) -> float:
        if not items:
            return float("nan")
        place = ddp.place()
        mine = items[place.rank::place.world] if ddp.active() else items
        loader = torch.utils.data.DataLoader(self.imf.EvalSet(mine, ten=ten), batch_size=32 if ten else 128,
                                             pin_memory=device.type == "cuda", **self.imf.loader_options(self.workers))
        mean = self.mean.to(device)
        wrong = torch.zeros((), device=device, dtype=torch.long)
        model.eval()
        for x, y in self.imf.batches(loader):
            x = x.to(device, non_blocking=True).float().div_(255).sub_(mean)
            if ten:  # (B, 10, C, H, W): the ten crops' softmax outputs averaged, as in the paper's 10-crop test
                b = len(x)
                x = x.flatten(0, 1)
            if ex.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(ex.amp, device):
                logits = model(x).float()
            pred = (logits.softmax(1).view(b, 10, -1).mean(1) if ten else logits).argmax(1)
            wrong += (pred != y.to(device)).sum()
        model.train()
        return int(ddp.all_sum(wrong)) / len(items)

    def evaluate(self, model, split: str, ex: Execution, device, members) -> list[float]:
        return [self._error(model, self.sets[split], ex, device, ten=False)]

    def final(self, model, ex: Execution, device, recipe) -> dict:
        if not recipe.ten_crop:
            return {}
        ddp.sync_buffers(model)
        return dict(final_test_err_10crop=self._error(model, self.sets["test"], ex, device, ten=True))


def tree_fingerprint(tree) -> str:
    """sha256 of a tree's file names (relative to its root) and sizes: its bytes would take hours to hash
    at ImageNet's size. An archive counts with its own size. One stat per file (1.33M at ImageNet's size):
    computed by rank 0 only, the process that writes the records."""
    archive = Path(tree.root).is_file()
    sha = hashlib.sha256()
    sha.update(f"{Path(tree.root).name}|{os.path.getsize(tree.root) if archive else ''}\n".encode())
    for rel in (tree.train + tree.val).rel.tolist():
        name = rel.decode()
        sha.update(f"{name}|{'' if archive else os.path.getsize(os.path.join(tree.root, name))}\n".encode())
    return sha.hexdigest()


def load(specs: list[RunSpec], ex: Execution, device: torch.device, data_root, download: bool):
    r = specs[0].recipe
    if data.TABLE[specs[0].dataset].streams:
        # rank 0 scans the tree (and caches the scan); the others then read its cache instead of listing it again
        main = ddp.place().main
        tree = data.load_tree(specs[0].dataset, data_root, download) if main else None
        ddp.from_main(None)
        return Streamed(tree or data.load_tree(specs[0].dataset, data_root, download), r, device, ex)
    return Held(data.load(specs[0].dataset, data_root, download), r, device)


Source = Held | Streamed  # loaders(), batch(), evaluate(), final(), and the set's description
