"""Specs: named recipes, one frozen RunSpec per training run, and the SweepSpec grid.

A run is a pure function of its RunSpec (plus hardware), so ``run_id`` is a hash of the spec:
rerunning a sweep finds the runs it already finished. How a run executes (device, precision,
memory format, compile) is an ``Execution``: recorded in every row but not part of the identity,
so a sweep started on one machine can be resumed on another.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace

from bench.datasets import TABLE

NORMALIZATIONS = ("pixel-mean", "standardize", "pln")  # Recipe.normalize (bench.data.Norm)


def _nets():
    """The registry of nets (resnet): imported when a run's net is named, not when a recipe is read (the CLI's
    help, the report), since it imports torch."""
    import resnet

    return resnet
SCHEDULES = ("step", "cosine")  # Recipe.schedule


@dataclass(frozen=True)
class Recipe:
    """How to train. Iterations count optimizer steps; errors are fractions."""

    name: str
    batch_size: int = 128
    lr: float = 0.1  # base learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-4  # applied to every parameter, BN included, as in the paper
    iterations: int = 64_000  # total optimizer steps
    milestones: tuple[int, ...] = (32_000, 48_000)  # lr *= lr_decay at each of these steps
    lr_decay: float = 0.1
    # "step": lr * lr_decay ** (milestones passed), the paper's; "cosine": lr * (1 + cos(pi t / T)) / 2 from the
    # end of any warm-up to 0 at the last step (Loshchilov and Hutter 2017 without restarts; milestones unused)
    schedule: str = "step"
    warmup_lr: float = 0.01  # used for the first warmup_iters steps of deep nets only
    warmup_iters: int = 400  # He et al.: 0.01 "until the training error is below 80% (about 400 iterations)"
    warmup_min_depth: int = 110  # nets at least this deep get the warm-up
    val_size: int = 5_000  # held out of the 50k training images (the paper's 45k/5k split)
    train_size: int | None = None  # train on the first N of the remaining images; None = all
    test_size: int | None = None  # evaluate on the first N test images; None = all 10k
    eval_every: int = 1_000  # steps between evaluation points (curve rows, checkpoints)
    # ImageNet-style data only (bench.imagefolder); at these defaults, not part of a run's identity
    ten_crop: bool = False  # the final test error also by the paper's 10-crop test (final_test_err_10crop)
    lighting: bool = False  # Krizhevsky et al.'s colour augmentation (PCA lighting) on top of the paper's
    # added for the methods' own recipes (at these defaults, He et al.'s, and not part of a run's identity):
    # the input: "pixel-mean" (He et al.: /255, the training set's per-pixel mean image subtracted),
    # "standardize" (per channel: minus its mean, over its standard deviation: unit variance, as Fixup's
    # and most codebases' preprocessing), "pln" (standardize, then per-location normalisation with a
    # homogeneous coordinate after augmentation, as dks recommends for TAT: one input channel more); bench.data.Norm
    normalize: str = "pixel-mean"
    mixup: float = 0.0  # Zhang et al. 2018's mixup: each batch mixed with a permutation of itself, Beta(a, a) weight; 0 off
    decay_1d: bool = True  # weight decay also on 1-D parameters (biases, BN's affine, per-channel scales); False as DiracNet's v2 code
    # "epochs": iterations, milestones and eval_every count epochs of the training set found (steps per epoch =
    # its images // batch_size, known when the data is loaded: ImageNet's 1,281,167 give 5,004 of 256, not the
    # 5,005 a fixed count assumed); "steps": optimizer steps. warmup_iters counts steps either way
    schedule_in: str = "steps"

    def in_steps(self, steps_per_epoch: int) -> "Recipe":
        """This recipe with its schedule in optimizer steps (an epoch-based one resolved for ``steps_per_epoch``)."""
        if self.schedule_in == "steps":
            return self
        return replace(self, schedule_in="steps", iterations=self.iterations * steps_per_epoch,
                       milestones=tuple(m * steps_per_epoch for m in self.milestones),
                       eval_every=self.eval_every * steps_per_epoch)

    def lr_at(self, it: int, depth: int) -> float:
        """Learning rate for step ``it`` (0-based) of a net of ``depth`` layers."""
        warm = depth >= self.warmup_min_depth
        if warm and it < self.warmup_iters:
            return self.warmup_lr
        if self.schedule == "cosine":
            start = self.warmup_iters if warm else 0
            return self.lr * (1 + math.cos(math.pi * (it - start) / max(1, self.iterations - start))) / 2
        return self.lr * self.lr_decay ** sum(it >= m for m in self.milestones)

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.iterations >= 1, "iterations must be >= 1"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.lr > 0, "lr must be positive"),
            (self.val_size >= 0, "val_size must be >= 0"),
            (self.train_size is None or self.train_size >= self.batch_size, "train_size must be at least batch_size"),
            (self.test_size is None or self.test_size >= 1, "test_size must be >= 1"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.warmup_iters >= 0, "warmup_iters must be >= 0"),
            (self.warmup_lr > 0, "warmup_lr must be positive"),
            (self.normalize in NORMALIZATIONS, f"normalize must be one of {', '.join(NORMALIZATIONS)}"),
            (self.mixup >= 0, "mixup must be >= 0 (0: off)"),
            (self.schedule_in in ("steps", "epochs"), "schedule_in must be steps or epochs"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"recipe {self.name!r}: {msg}")


RECIPES = {
    # He et al. 2015, sec. 4.2, exactly: SGD 0.9 / 1e-4, batch 128, 0.1 -> /10 at 32k and 48k,
    # stop at 64k, 45k/5k split, warm-up at 0.01 for 400 steps for ResNet-110 and deeper.
    "he2015": Recipe("he2015"),
    # A tenth of the paper's schedule, same shape (decay at 1/2 and 3/4): about 18 epochs
    # of the 45k training split (6,400 x 128 images).
    # The degradation shows from the first epochs on (He et al. Fig. 6), so the ordering of the
    # training curves is already clear; absolute errors are a few points above the paper's.
    "quick": Recipe("quick", iterations=6_400, milestones=(3_200, 4_800), eval_every=400),
    # CPU scale: narrow twins (width 0.5, set by the preset), 5k training images, batch 64, lr 0.05 divided by 10
    # at half and three quarters of the 400 steps (the paper's shape: final errors read at a small lr, where
    # they settle; until 2026-12 the lr stayed constant, and seeds spread more: README, "A recipe that
    # settles"), 1k validation and 2k test images. The 6-run smoke sweep trains in minutes on 2 CPU cores.
    "smoke": Recipe("smoke", batch_size=64, lr=0.05, iterations=400, milestones=(200, 300), val_size=1_000,
                    train_size=5_000, test_size=2_000, eval_every=100),
    # Fixup's CIFAR-10 script (hongyi-zhang/Fixup, cifar/cifar_train.py, its defaults: Zhang, Dauphin, Ma 2019):
    # batch 128, lr 0.1 (Fixup's scalar biases and multipliers at lr / 10: the family's lr_scales), momentum 0.9,
    # weight decay 1e-4 on every parameter, 200 epochs of all 50k training images (no validation split; the
    # script reports the test set), /10 after epochs 100 and 150, mixup with alpha 1 for every net, inputs
    # standardized per channel, no warm-up. The script's last partial batch of each epoch (391 steps of up to
    # 128) is dropped here (390 full batches an epoch, 78,000 steps), and its fixed normalisation constants
    # are the training set's own per-channel mean and std here (README)
    "fixup2019": Recipe("fixup2019", batch_size=128, lr=0.1, iterations=200, milestones=(100, 150), val_size=0,
                        eval_every=5, normalize="standardize", mixup=1.0, warmup_iters=0, schedule_in="epochs"),
    # He et al. 2015 sec. 3.4 on ImageNet: batch 256, lr 0.1, momentum 0.9, weight decay 1e-4, the paper's
    # scale augmentation, "the standard color augmentation in [21]" (Krizhevsky et al.'s PCA lighting) and
    # 10-crop test, ImageNet's val set as the test set (no images held out). The paper divides the lr by 10
    # "when the error plateaus" within 60e4 iterations; a plateau rule is not reproducible, so here fixed: /10
    # after epochs 30 and 60 of 90 (torchvision's reference recipe; 90 epochs of the 1,281,167 training images
    # are 90 x 5,004 = 450,360 steps of 256), an evaluation point per epoch.
    "he2015-imagenet": Recipe("he2015-imagenet", batch_size=256, iterations=90, milestones=(30, 60), val_size=0,
                              eval_every=1, ten_crop=True, lighting=True, schedule_in="epochs"),
    # A single-GPU proxy on Imagenette (10 ImageNet classes, 9,469 training and 3,925 val images): batch 128
    # at lr 0.05 (the paper's 0.1 per 256, scaled), 40 epochs (of 73 steps), /10 after epochs 20 and 30.
    "imagenette": Recipe("imagenette", batch_size=128, lr=0.05, iterations=40, milestones=(20, 30), val_size=0,
                         eval_every=1, ten_crop=True, schedule_in="epochs"),
}
# recipe fields added after the first records: left out of a run's identity at their defaults
LATE_RECIPE_DEFAULTS = {"ten_crop": False, "lighting": False, "normalize": "pixel-mean", "mixup": 0.0, "decay_1d": True,
                        "schedule_in": "steps", "schedule": "step"}


def recipe(name: str, **overrides) -> Recipe:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class RunSpec:
    """One training run: what to train, on what, how and with which seed. Its identity."""

    model: str  # a resnet.build name, e.g. "plain56"
    recipe: Recipe
    seed: int = 0
    width: float = 1.0  # channel multiplier
    shortcut: str = "A"  # A / B / C (resnet.blocks)
    dataset: str = "cifar10"
    sweep: str = ""  # the sweep this run belongs to (a name, not part of the identity)
    # images BatchNorm's batch statistics come from, where fewer than the whole batch: a data-parallel run
    # without --sync-bn normalises each process's share (bench.ddp). None: the whole batch
    bn_batch: int | None = None
    # how its lr came about, like ``sweep`` recorded but not part of the identity (the same training is the
    # same run however its lr was found): "" given, "grid" one lr of a tuned sweep's grid (bench.tuning),
    # "chosen" trained at the grid's lr with the lowest validation error; ``lr_grid`` the grid
    lr_tuning: str = ""
    lr_grid: tuple[float, ...] = ()
    grid_seeds: tuple[int, ...] = ()  # a tuned sweep's seeds the grid trains on (its results: the other seeds)
    grid_widen: int = 2  # a tuned sweep: factor-2 steps its grid may grow at each end (bench.tuning)

    def __post_init__(self):
        _nets().parse(self.model)  # ValueError with the naming rules
        if self.bn_batch is not None and (self.bn_batch < 1 or self.recipe.batch_size % self.bn_batch):
            raise ValueError(f"bn_batch must divide the batch of {self.recipe.batch_size}, got {self.bn_batch}")
        if TABLE[self.dataset].streams and (self.recipe.normalize != "pixel-mean" or self.recipe.mixup):
            raise ValueError(f"{self.dataset}: ImageNet-style data takes the paper's per-pixel mean (normalize "
                             f"pixel-mean) without mixup; --normalize and --mixup are for CIFAR-like data sets")
        if not TABLE[self.dataset].streams and (self.recipe.lighting or self.recipe.ten_crop):
            raise ValueError(f"{self.dataset}: lighting and ten_crop are for ImageNet-style data (imagenet, imagenette)")
        if self.lr_tuning not in LR_TUNING:
            raise ValueError(f"lr_tuning must be one of {', '.join(map(repr, LR_TUNING))}, got {self.lr_tuning!r}")

    @property
    def arch(self) -> "resnet.ModelName":  # noqa: F821
        return _nets().parse(self.model)

    @property
    def net_label(self) -> str:
        """What the report calls the net: plain or residual for He et al.'s kinds, else its kind."""
        m = self.arch.method
        return ("residual" if m.residual else "plain") if m.baseline else self.arch.kind

    def identity(self) -> dict:
        """What the run_id hashes: the spec, and for a method or plugin kind what defines it beyond its
        name (its hyper-parameters, the parameter groups it trains at another lr, a plugin's package and
        version). He et al.'s kinds add nothing, so their run_ids are those of earlier versions."""
        d = asdict(self)
        for key in NOT_IDENTITY:
            d.pop(key)
        if d["bn_batch"] is None:  # the whole batch, as every run of earlier versions: their run_ids stay
            d.pop("bn_batch")
        for key, default in LATE_RECIPE_DEFAULTS.items():
            if d["recipe"][key] == default:
                d["recipe"].pop(key)
        info = method_info(self.model)
        if info:
            d["method"] = info
        return d

    @property
    def run_id(self) -> str:
        digest = hashlib.sha1(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.model}-{self.dataset}-{self.recipe.name}-s{self.seed}-{digest}"

    def flat(self) -> dict:
        """The spec as flat record columns (recipe fields inlined; milestones as text; a method's
        hyper-parameters and parameter groups as JSON text)."""
        a = self.arch
        m, info = a.method, method_info(self.model)
        row = dict(run_id=self.run_id, sweep=self.sweep, model=self.model, family=a.family, kind=a.kind,
                   method=a.kind, normalization=m.normalization,
                   # what a reader needs to know of the net, from its family (the report reads these, not the registry)
                   net_label=self.net_label, baseline=m.baseline,
                   pre_activation=m.pre_activation, has_bn=m.normalization == "bn",
                   groupable=_nets().groupable(self.model, self.shortcut),
                   method_params=json.dumps(info.get("params", {}), sort_keys=True),
                   lr_scales=json.dumps(info.get("lr_scales", [])),
                   plugin=f"{m.package}=={m.version}" if m.package else None,
                   depth=a.depth, residual=a.residual, shortcut=self.shortcut, width=self.width,
                   dataset=self.dataset, seed=self.seed, bn_batch=self.bn_batch,
                   method_recipe=method_recipe(self.model, self.recipe), lr_tuning=self.lr_tuning,
                   lr_grid=list(self.lr_grid), lr_grid_seeds=list(self.grid_seeds),
                   lr_grid_widen=self.grid_widen if self.lr_tuning else None,
                   lr_chosen_by=CHOSEN_BY if self.lr_tuning == "chosen" else "")
        for f in fields(Recipe):
            v = getattr(self.recipe, f.name)
            row["recipe" if f.name == "name" else f.name] = ",".join(map(str, v)) if isinstance(v, tuple) else v
        return row

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """The spec as JSON text (how checkpoints and weights files carry it: no pickled objects)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: "dict | str") -> "RunSpec":
        """From ``to_dict()`` or ``to_json()`` output (weights files of earlier versions hold the dict)."""
        if isinstance(d, str):
            d = json.loads(d)
        r = dict(d["recipe"])
        r["milestones"] = tuple(r["milestones"])
        return cls(**{**d, "recipe": Recipe(**r), "lr_grid": tuple(d.get("lr_grid", ())),
                      "grid_seeds": tuple(d.get("grid_seeds", ())), "grid_widen": d.get("grid_widen", 2)})


NOT_IDENTITY = ("sweep", "lr_tuning", "lr_grid", "grid_seeds", "grid_widen")  # RunSpec fields recorded in rows, not hashed into the run_id
LR_TUNING = ("", "grid", "chosen")
# how a tuned sweep chooses (bench.tuning.choose): the rule, in every "chosen" row
CHOSEN_BY = ("lowest validation error, averaged over the evaluation points of the last quarter of the steps and over the "
             "grid seeds, of the lr grid's runs (an lr with a diverged run excluded); at an edge of the grid, the grid "
             "widened by a factor 2, at most twice per side")


def method_recipe(model: str, r: Recipe) -> str:
    """'paper' where ``r`` holds every setting the net's family lists as its paper's own (Family.paper_recipe:
    Fixup's standardized input and mixup, ...), else 'matched' (the recipe every kind shares)."""
    own = _nets().parse(model).method.paper_recipe
    return "paper" if own and all(getattr(r, k) == v for k, v in own.items()) else "matched"


def method_info(model: str) -> dict:
    """A family's defining settings beyond its name (hyper-parameters, parameter groups at another lr, a plugin's
    package); {} where it has none, as He et al.'s kinds (so their run_ids are those of earlier versions)."""
    m = _nets().parse(model).method
    info = dict(params=m.params, lr_scales=[list(x) for x in m.lr_scales])
    if m.package:
        info["plugin"] = f"{m.package}=={m.version}"
    return {k: v for k, v in info.items() if v}


@dataclass(frozen=True)
class Execution:
    """How a run executes. Recorded in each row; not part of the run's identity."""

    device: str = "cpu"  # "cpu" or "cuda[:i]"
    amp: bool = False  # bf16 autocast (parameters, BN's included, and BN statistics stay fp32)
    channels_last: bool = False
    execution: str = "eager"  # eager | compile | cudagraph (bench.steps)
    cudnn_benchmark: bool = False
    eval_batch_size: int = 1000
    # run groups: zero-pad each member's input to this many channels (4 or 8) for cuDNN's NHWC kernels;
    # 0 = off. Off until a GPU measurement shows it pays (resnet.group; `resbench profile --pad-inputs`)
    pad_input: int = 0
    world_size: int = 1  # processes of a data-parallel run (bench.ddp); 1: one process
    loader_workers: int = 4  # ImageNet-style data: processes that decode each process's batches (bench.imagefolder)
    decode_on: str = "workers"  # ImageNet-style data: "device" has the workers read and the run's device decode
    sync_bn: bool = False  # a data-parallel run's BatchNorm over the whole batch (CUDA only)
    tensorboard: bool = False  # each run's scalars at every evaluation point into <out>/tb/<run_id> (bench.train)

    @classmethod
    def for_device(cls, device: str = "auto", **overrides) -> "Execution":
        """Defaults per device: channels_last; bf16 autocast where the hardware has fast bf16; cuDNN autotuning on CUDA."""
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu or auto")
        if device not in ("cpu",) and not device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        cuda = device.startswith("cuda")
        # channels_last and bf16 pay on the CPU too where oneDNN has native bf16 (AVX512-BF16/AMX):
        # resnet20 training at batch 128 on 2 cores ran ~2x faster (see README)
        base = cls(device=device, amp=cuda or _cpu_bf16(), channels_last=True, cudnn_benchmark=cuda,
                   eval_batch_size=2000 if cuda else 500)
        if cuda:
            # one CUDA graph per step: 3.7x eager for ResNet-20 and 4.3x for ResNet-56 training at
            # batch 128 on an H200 (results/profile-h200); the same updates as eager (tests/test_fastpath)
            base = replace(base, execution="cudagraph")
        ex = replace(base, **{k: v for k, v in overrides.items() if v is not None})
        if ex.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {', '.join(EXECUTIONS)}, got {ex.execution!r}")
        if ex.execution == "cudagraph" and not cuda:
            raise ValueError("execution 'cudagraph' needs CUDA; use eager or compile on the CPU")
        if ex.pad_input not in PAD_INPUTS:
            raise ValueError(f"pad_input must be one of {', '.join(map(str, PAD_INPUTS))}, got {ex.pad_input!r}")
        if ex.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {ex.world_size}")
        if ex.world_size > 1 and ex.execution == "cudagraph":
            ex = replace(ex, execution="eager") if overrides.get("execution") is None else ex
            if ex.execution == "cudagraph":
                raise ValueError("a data-parallel run cannot capture its step in a CUDA graph here (DDP's "
                                 "gradient hooks); use --execution eager or compile")
        if ex.sync_bn and not cuda:
            raise ValueError("--sync-bn needs CUDA (torch's SyncBatchNorm runs on GPUs only)")
        return ex


METHOD_RECIPES = ("matched", "paper")  # SweepSpec.method_recipe
# the most runs --fuse auto puts in one group (bench.fuse.plan): the paper's grid has 5 seeds x plain/residual per depth
AUTO_GROUP = 10
FUSE_HELP = ("auto: on CUDA, runs of one shape (depth, width, recipe; plain and residual twins, any seeds) "
             f"train as one grouped network, up to {AUTO_GROUP} at a time; on the CPU, each alone. "
             "off: each alone. K: groups of up to K, on any device")
LESION_DRAWS = 10  # resbench diagnose: random sets of k deleted blocks per k (bench.analysis)


@dataclass(frozen=True)
class Fuse:
    """``--fuse``, parsed once on the command line (``Fuse.of``; the code passes this type on): ``size`` None for
    auto (on CUDA as many runs of one shape as fit, up to AUTO_GROUP; on the CPU each alone), 1 for off (each run
    alone), K for groups of up to K."""

    size: int | None = None

    @classmethod
    def of(cls, value: "Fuse | str | int") -> "Fuse":
        """"auto", "off" or "K" (K >= 1), as typed; a Fuse as it is. ValueError otherwise."""
        if isinstance(value, Fuse):
            return value
        v = str(value).strip().lower()
        if v == "auto":
            return cls(None)
        if v == "off":
            return cls(1)
        if v.isdigit() and int(v) >= 1:
            return cls(int(v))
        raise ValueError(f"--fuse must be auto, off or a group size >= 1, got {value!r}")

    def __str__(self) -> str:
        return "auto" if self.size is None else "off" if self.size == 1 else str(self.size)


EXECUTIONS = ("eager", "compile", "cudagraph")  # Execution.execution: how bench.steps runs a training step
PAD_INPUTS = (0, 4, 8)  # 0: off; else each member's input channels, zero-padded (bench.fuse, resnet.group)


def _cpu_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions natively (else bf16 autocast would be slower)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


IMAGENET_FAMILY_DEPTHS = (18, 34, 50, 101, 152)  # resnet.IMAGENET_DEPTHS, said here for the CLI's help without torch


def model_name(kind: str, depth: int, family: str = "cifar") -> str:
    """The name of a grid cell's net in ``family``: "cifar" (He et al. sec. 4.2, 6n+2 layers; at 50 and 152 the
    name needs the cifar_ prefix) or "imagenet" (ResNet-18..152). One rule for every depth: a depth outside the
    family is a ValueError naming both families' depths, never a silent switch to the other family."""
    name = f"{kind}{depth}"
    if family == "imagenet":
        if depth not in IMAGENET_FAMILY_DEPTHS:
            raise ValueError(f"depth {depth} is not one of the ImageNet-style family's ({', '.join(map(str, IMAGENET_FAMILY_DEPTHS))}), "
                             f"which ImageNet-style data sets train; the CIFAR family's depths are 6n+2 (8, 14, 20, ...)")
        family_of_kind = _nets().method(kind)
        if family_of_kind is not None and not family_of_kind.imagenet:
            raise ValueError(f"{kind} has no ImageNet-style nets (only He et al.'s resnet and plain do)")
        return _nets().parse(name).name
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"depth {depth} is not a CIFAR-family depth (6n+2: 8, 14, 20, 32, 44, 56, 110, ...), which "
                         f"CIFAR-like data sets train; the ImageNet-style family ({', '.join(map(str, IMAGENET_FAMILY_DEPTHS))}) "
                         f"trains on ImageNet-style data (--dataset imagenet or imagenette); `resbench run {name}` trains "
                         f"one such net on any data set")
    return f"cifar_{name}" if _nets().parse(name).family == "imagenet" else name


# The presets of `resbench sweep`: a recipe plus the grid's defaults.
PRESETS = {
    "he2015": dict(recipe="he2015", models=("plain", "resnet"), depths=(20, 32, 44, 56), seeds=(0,), width=1.0),
    "quick": dict(recipe="quick", models=("plain", "resnet"), depths=(20, 32, 44, 56), seeds=(0,), width=1.0),
    "smoke": dict(recipe="smoke", models=("plain", "resnet"), depths=(8, 20, 44), seeds=(0,), width=0.5),
    # a method paper's headline number, for a GPU: Fixup's script for ResNet, Fixup and ReZero at 56 and 110 layers
    "fixup2019": dict(recipe="fixup2019", models=("resnet", "fixup", "rezero"), depths=(56, 110), seeds=(0,), width=1.0),
    # He et al.'s Table 2 / Figure 4: plain and residual 18 and 34 (option A shortcuts, the 7x7 stem)
    "he2015-imagenet": dict(recipe="he2015-imagenet", models=("plain", "resnet"), depths=(18, 34), seeds=(0,),
                            width=1.0, dataset="imagenet"),
    "imagenette": dict(recipe="imagenette", models=("plain", "resnet"), depths=(18, 34), seeds=(0,), width=1.0,
                       dataset="imagenette"),
}


# `--lr-grid preset`: each preset's grid of a tuned sweep (bench.tuning), factors of 2 around its recipe's lr and
# reaching well below it (methods without BN or shortcuts train at far smaller lrs: TAT's best smoke lr is ~0.005)
LR_GRIDS = {
    "smoke": tuple(0.2 / 2 ** k for k in range(6, -1, -1)),  # 0.003125 .. 0.2: seven values, the recipe's 0.05 among them
    "quick": tuple(0.4 / 2 ** k for k in range(6, -1, -1)),  # 0.00625 .. 0.4, the paper's 0.1 among them
    "he2015": tuple(0.4 / 2 ** k for k in range(6, -1, -1)),
}


@dataclass(frozen=True)
class SweepSpec:
    """A grid: model kinds x depths x seeds, all with one recipe."""

    name: str
    recipe: Recipe
    models: tuple[str, ...] = ("plain", "resnet")
    depths: tuple[int, ...] = (20, 32, 44, 56)
    seeds: tuple[int, ...] = (0,)
    width: float = 1.0
    shortcut: str = "A"
    dataset: str = "cifar10"
    extra: dict = field(default_factory=dict)  # free-form notes written to sweep.toml
    bn_batch: int | None = None  # RunSpec.bn_batch of every run (data-parallel runs without --sync-bn)
    lr_for: tuple[tuple[str, float], ...] = ()  # (kind, lr): those kinds train at their own lr, the rest at the recipe's
    # a tuned sweep (bench.tuning): each (kind, depth) trains every lr of the grid on the first ``grid_seeds`` seeds,
    # then the lr with the lowest validation error on the other seeds. (): every run at its kind's lr
    lr_grid: tuple[float, ...] = ()
    method_recipe: str = "matched"  # "paper": each kind with its family's own recipe settings (Family.paper_recipe)
    grid_seeds: int = 1  # a tuned sweep: how many of the first seeds train the grid (the results: the seeds after them)
    grid_widen: int = 2  # a tuned sweep: factor-2 steps a cell's grid may grow at each end when its choice sits there
    lr_grid_for: tuple[tuple[str, tuple[float, ...]], ...] = ()  # (kind, grid): kinds tuned on a grid of their own
    weight_decay_for: tuple[tuple[str, float], ...] = ()  # (kind, weight decay): kinds with their own weight decay

    def __post_init__(self):
        known = _nets().kinds()
        bad = [m for m in self.models if m not in known]
        if bad:
            plugins = ("; plugins loaded: " + ", ".join(_nets().PLUGINS.values())) if _nets().PLUGINS else ""
            if _nets().PLUGIN_ERRORS:
                plugins += "; plugins that failed to load: " + "; ".join(f"{k}: {v}" for k, v in _nets().PLUGIN_ERRORS.items())
            raise ValueError(f"unknown model kind(s) {', '.join(bad)}; choose from {', '.join(known)}{plugins}")
        if not (self.models and self.depths and self.seeds):
            raise ValueError("a sweep needs at least one model kind, one depth and one seed")
        unknown = [k for k, _ in self.lr_for if k not in known]
        if unknown:
            raise ValueError(f"--lr-for names unknown kind(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if any(lr <= 0 for _, lr in self.lr_for) or any(lr <= 0 for lr in self.lr_grid):
            raise ValueError("every learning rate of --lr-for and --lr-grid must be positive")
        if self.lr_grid and self.lr_for:
            raise ValueError("--lr-grid tunes every kind's lr and --lr-for fixes some: give one of them")
        if self.lr_grid and len(set(self.lr_grid)) < 2:
            raise ValueError("--lr-grid needs at least two learning rates to choose from")
        if self.lr_grid and not self.recipe.val_size:
            raise ValueError("a tuned sweep (--lr-grid) chooses each lr on validation error, never on test error: "
                             "--val-size 0 leaves no validation images")
        self._check_tuning(known)
        if self.method_recipe not in METHOD_RECIPES:
            raise ValueError(f"method_recipe must be one of {', '.join(METHOD_RECIPES)}, got {self.method_recipe!r}")

    def _check_tuning(self, known) -> None:
        named = [k for k, _ in self.lr_grid_for + self.weight_decay_for if k not in known]
        if named:
            raise ValueError(f"--lr-grid-for / --weight-decay-for name unknown kind(s) {', '.join(named)}; choose from "
                             f"{', '.join(known)}")
        if any(wd < 0 for _, wd in self.weight_decay_for):
            raise ValueError("every weight decay of --weight-decay-for must be >= 0")
        if self.lr_grid_for and not self.lr_grid:
            raise ValueError("--lr-grid-for gives some kinds a grid of their own in a tuned sweep: give --lr-grid "
                             "too (the grid of the other kinds)")
        for kind, grid in self.lr_grid_for:
            if len(set(grid)) < 2 or any(lr <= 0 for lr in grid):
                raise ValueError(f"--lr-grid-for {kind}: a grid needs at least two positive learning rates, got "
                                 f"{', '.join(map(str, grid)) or 'none'}")
        if self.grid_widen < 0:
            raise ValueError("--lr-grid-widen must be >= 0 (0: the grid never grows)")
        if self.lr_grid and not 1 <= self.grid_seeds < len(self.seeds):
            raise ValueError(f"a tuned sweep reports only seeds that took no part in choosing the lr: --seeds gives "
                             f"{len(self.seeds)} seed(s) and --grid-seeds {self.grid_seeds} of them train the grid; give "
                             f"more seeds (e.g. --seeds 0,1,2,3 --grid-seeds 1: the grid on seed 0, results on 1, 2, 3)")

    def grid_for(self, kind: str) -> tuple[float, ...]:
        """The lr grid ``kind`` is tuned on: its own (--lr-grid-for), else the sweep's."""
        return dict(self.lr_grid_for).get(kind, self.lr_grid)

    def to_toml(self) -> str:
        """The spec as TOML (written by hand: the standard library only reads TOML)."""
        def val(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, (int, float)):
                return repr(v)
            if isinstance(v, (tuple, list)):
                return "[" + ", ".join(val(x) for x in v) + "]"
            return json.dumps(str(v))

        tables = ("lr_for", "lr_grid_for", "weight_decay_for")  # (kind, value) pairs, each a TOML table
        top = {k: v for k, v in asdict(self).items() if k not in ("recipe", "extra") + tables and v is not None}
        lines = [f"{k} = {val(v)}" for k, v in top.items()]
        for name in tables:
            if getattr(self, name):
                lines += ["", f"[{name}]"] + [f"{k} = {val(v)}" for k, v in getattr(self, name)]
        lines += ["", "[recipe]"] + [f"{k} = {val(v)}" for k, v in asdict(self.recipe).items() if v is not None]
        if self.extra:
            lines += ["", "[extra]"] + [f"{k} = {val(v)}" for k, v in self.extra.items() if v is not None]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str) -> "SweepSpec":
        import tomllib

        conf = tomllib.loads(text)
        rec = conf.pop("recipe")
        # a field left out of a hand-written [recipe] is the Recipe default, milestones like the rest
        # (an empty list, as to_toml writes for a constant lr, stays empty)
        if "milestones" in rec:
            rec["milestones"] = tuple(rec["milestones"])
        extra = conf.pop("extra", {})
        lr_for = tuple(conf.pop("lr_for", {}).items())
        lr_grid_for = tuple((k, tuple(v)) for k, v in conf.pop("lr_grid_for", {}).items())
        weight_decay_for = tuple(conf.pop("weight_decay_for", {}).items())
        return cls(recipe=Recipe(**rec), extra=extra, lr_for=lr_for, lr_grid_for=lr_grid_for,
                   weight_decay_for=weight_decay_for,
                   **{k: tuple(v) if isinstance(v, list) else v for k, v in conf.items()})

    AXES = ("models", "depths", "seeds")

    def union(self, other: "SweepSpec") -> "SweepSpec":
        """This grid extended by ``other``'s models, depths and seeds (in order, without repeats).

        Only the axes may differ: the same folder holding two recipes, widths or data sets would be
        two experiments under one name, so that is a ValueError naming the difference.
        """
        mine, theirs = asdict(self), asdict(other)
        differ = [k for k in mine if k not in self.AXES + ("extra",) and mine[k] != theirs[k]]
        if differ:
            # a table of settings (the recipe) names only its keys that differ, not both whole tables
            what = "; ".join(
                "; ".join(f"{k}.{f}: {mine[k][f]!r} recorded, {theirs[k][f]!r} asked for" for f in mine[k]
                          if mine[k][f] != theirs[k].get(f)) if isinstance(mine[k], dict)
                else f"{k}: {mine[k]!r} recorded, {theirs[k]!r} asked for" for k in differ)
            raise ValueError(f"this folder holds sweep {self.name!r} with other settings ({what}). A sweep can be "
                             f"extended only along models, depths and seeds; use another --out for another experiment")
        grown = {k: tuple(dict.fromkeys(getattr(self, k) + getattr(other, k))) for k in self.AXES}
        return replace(self, extra={**self.extra, **other.extra}, **grown)

    def recipe_for(self, kind: str, lr: float | None = None) -> Recipe:
        """The recipe ``kind`` trains with: the sweep's, with the family's own settings under --method-recipe
        paper, at ``lr`` (else its --lr-for lr, else the recipe's)."""
        r = self.recipe
        m = _nets().method(kind)
        if self.method_recipe == "paper" and m is not None and m.paper_recipe:
            r = replace(r, **m.paper_recipe)
        r = replace(r, weight_decay=dict(self.weight_decay_for).get(kind, r.weight_decay))
        return replace(r, lr=lr if lr is not None else dict(self.lr_for).get(kind, r.lr))

    def _run(self, kind: str, depth: int, seed: int, lr: float | None = None, tuning: str = "") -> RunSpec:
        return RunSpec(model=model_name(kind, depth, TABLE[self.dataset].family), recipe=self.recipe_for(kind, lr), seed=seed, width=self.width,
                       shortcut=self.shortcut, dataset=self.dataset, sweep=self.name, bn_batch=self.bn_batch,
                       lr_tuning=tuning, lr_grid=self.grid_for(kind) if tuning else (),
                       grid_seeds=self.seeds[:self.grid_seeds] if tuning else (), grid_widen=self.grid_widen)

    def runs(self, chosen: dict[tuple[str, int], float] | None = None,
             grids: dict[tuple[str, int], tuple[float, ...]] | None = None) -> list[RunSpec]:
        """Every run of the grid, shallow first (so partial sweeps show the whole depth range early).

        A tuned sweep (``lr_grid``): each (kind, depth)'s grid runs on the first ``grid_seeds`` seeds, over its
        grid (``grids``, where bench.tuning has widened it at an edge; else ``grid_for``), then, for the cells
        ``chosen`` holds ((kind, depth) -> lr, bench.tuning.chosen), that lr on the other seeds."""
        if not self.lr_grid:
            return [self._run(kind, depth, seed) for seed in self.seeds for depth in self.depths for kind in self.models]
        chosen, grids = chosen or {}, grids or {}
        grid = [self._run(kind, depth, seed, lr, "grid") for depth in self.depths for kind in self.models
                for lr in grids.get((kind, depth), self.grid_for(kind)) for seed in self.seeds[:self.grid_seeds]]
        return grid + [self._run(kind, depth, seed, chosen[(kind, depth)], "chosen")
                       for seed in self.seeds[self.grid_seeds:] for depth in self.depths for kind in self.models
                       if (kind, depth) in chosen]
