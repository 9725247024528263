"""Analyses of trained nets from their saved final weights (no retraining): `resbench diagnose`.

``response_rows``: He et al. 2015 Fig. 7, the standard deviation of each 3x3 conv layer's
response (after BN, before the addition and the ReLU) on the test set, per layer index.

``lesion_errors``: Veit, Wilber and Belongie 2016: test error with blocks deleted at test time.
Plain and residual twins are compared on the same block positions: the blocks that keep their
input's shape (every block but each stage's first, downsampling one), which both can lose (a
residual block becomes its shortcut and final ReLU, a plain one the identity). Each such block is
deleted alone (``mode="single"``), and k of them together (``mode="random"``): ``draws`` random
sets for each k, from a generator seeded by (run seed, k), so two seeds lose different sets and a
rerun the same ones; where fewer distinct sets exist than ``draws``, each is taken once. A
residual net's downsampling blocks (deletable there, not in a plain net) are reported apart
(``position="downsampling"``). By default on the whole test set (Veit et al. used all 10,000); of an
ImageNet-style set, on the centre crops of its first ``TREE_IMAGES`` val/ images.

``shattered``: Balduzzi et al. 2017, "The Shattered Gradients Problem". Exactly: for a test image
x0 (normalised as in training), a random direction u with one unit of norm per pixel
(||u|| = sqrt(D)) and a step h (in normalised units, whose pixel spread is ~0.25), take the input
gradient g_t of f(x) = z_c(x) - mean_j z_j(x) at the points x_t = x0 + t h u, t = -T..T, where z
are the logits and c the class predicted at x0 (subtracting the mean logit removes the part of
the gradient every class shares). The measure at distance d = k h is the cosine similarity of the
gradient at the image and at distance d, averaged over both directions:
C(d) = (cos(g_0, g_k) + cos(g_0, g_-k)) / 2. C(0) = 1; a linear map keeps C = 1 at every
distance; gradients that decorrelate with distance ("shattered") fall towards 0. Computed in
evaluation mode, after training (BN's running statistics) and at initialisation, from the run's
seed, with BN's statistics first filled from real training images (``calibrate_bn``): a fresh BN
layer's running statistics (mean 0, variance 1) would make it the identity, and the initial net a
net without BN.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from itertools import combinations
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import resnet
from bench import checkpoints, data, records
from bench.progress import duration
from bench.specs import LESION_DRAWS, Execution, RunSpec

CALIBRATION_IMAGES = 512  # training images whose batch statistics an initial net's BN layers get
LINE_STEPS = 32  # T: points on each side of the image
LINE_STEP = 0.002  # h, per pixel in normalised units: the line spans +-0.064, a quarter of the pixel spread
TREE_IMAGES = 1000  # test images of an ImageNet-style set diagnosed when --max-images is not given


def _saved_nets(results_dir: Path, runs: pd.DataFrame, data_root, notes: list | None, what: str,
                tree_images: int = TREE_IMAGES):
    """(run row, spec, trained net, test images, their labels, pixel mean, training images) of each ok
    run with readable weights. The data set is found through ``data_root``, else the runs' recorded
    ``data_source``. The test images are all of the set's (the run's recipe may have used fewer); of an
    ImageNet-style set, the centre crops of the first ``tree_images`` of val/ (all of ImageNet's would
    take 7.5 GB), and the training images (for BN calibration) the centre crops of the first 512."""
    arrays_by_set: dict = {}
    tests_by_set: dict = {}
    ok = runs[runs["status"] == "ok"] if "status" in runs else runs
    for _, run in ok.iterrows():
        wpath = records.paths(results_dir, run["run_id"])["weights"]
        if not wpath.exists():
            continue
        try:
            saved = checkpoints.load_torch(wpath, map_location="cpu")
        except checkpoints.UnreadableFile as e:
            if notes is not None:
                notes.append(f"{what}: {run['run_id']} left out: {e}")
            continue
        spec = RunSpec.from_dict(saved["spec"])
        r = spec.recipe
        if spec.dataset not in arrays_by_set:
            source = data_root
            if source is None and isinstance(run.get("data_source"), str) and Path(run["data_source"]).exists():
                source = run["data_source"]
            load = data.load_tree if data.TABLE[spec.dataset].streams else data.load
            arrays_by_set[spec.dataset] = load(spec.dataset, source)
        if data.TABLE[spec.dataset].streams:
            from bench.imagefolder import tree_mean, tree_sets

            tree = arrays_by_set[spec.dataset]
            if spec.dataset not in tests_by_set:
                tests_by_set[spec.dataset] = _centre_crops(tree.val[:tree_images])
                if notes is not None:
                    notes.append(f"{what}: {spec.dataset} (ImageNet-style data): the centre crops of the first "
                                 f"{len(tests_by_set[spec.dataset][1])} of {len(tree.val)} val/ images")
            train_items = tree_sets(tree, r)["train"]
            test_x, test_y = tests_by_set[spec.dataset]
            mean, train_x = tree_mean(tree, train_items), _centre_crops(train_items[:CALIBRATION_IMAGES])[0]
        else:
            arrays = arrays_by_set[spec.dataset]
            train_x = data.split(arrays, r.val_size, r.train_size)["train"][0]
            test_x, test_y, mean = arrays.test_x, arrays.test_y, data.Norm.of(r.normalize, train_x)
        net = build_net(spec, saved["num_classes"], saved["in_channels"])
        net.load_state_dict(saved["model"])
        yield run, spec, net.eval(), test_x, test_y, mean, train_x


def build_net(spec: RunSpec, num_classes: int, in_channels: int) -> nn.Module:
    """``spec``'s network as the trainer builds it (the 7x7 stem for the ImageNet-style family on 224 px)."""
    return resnet.build(spec.model, num_classes, width=spec.width, shortcut=spec.shortcut, in_channels=in_channels,
                        stem=data.stem(spec.dataset, spec.model))


def _centre_crops(items) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, 224, 224) centre crops of ImageNet-style ``items`` (evaluation's), and their labels."""
    from bench import imagefolder as imf

    loader = torch.utils.data.DataLoader(imf.EvalSet(items, ten=False), batch_size=64, num_workers=0)
    xs, ys = zip(*loader) if items else ((torch.zeros(0, 3, imf.CROP, imf.CROP, dtype=torch.uint8),),
                                         (torch.zeros(0, dtype=torch.long),))
    return torch.cat(xs), torch.cat(ys)


def _ids(run, spec) -> dict:
    return dict(run_id=run["run_id"], model=spec.model, kind=spec.arch.kind, method=spec.arch.kind,
                depth=spec.arch.depth, seed=spec.seed, residual=spec.arch.residual)


def response_rows(run, spec: RunSpec, net, x: torch.Tensor, mean, batch_size: int = 500) -> list[dict]:
    """He et al. Fig. 7's rows of one run: per 3x3 conv layer, the std of its response (after BN, before the
    addition and the ReLU) on the test images the run was evaluated on (its recipe's test_size of ``x``),
    normalised as in training. None for pre-activation nets, which have no such response."""
    if spec.arch.preact:
        return []
    batches = data.eval_batches(x[: spec.recipe.test_size or len(x)], mean, batch_size, torch.device("cpu"))
    return [dict(run_id=run["run_id"], model=spec.model, kind=spec.arch.kind, depth=spec.arch.depth, seed=spec.seed,
                 layer=i, layer_name=name, std=std) for i, (name, std) in enumerate(resnet.layer_responses(net, batches), 1)]


# -- BN at initialisation ------------------------------------------------------------------------------

@torch.no_grad()
def calibrate_bn(net: nn.Module, batches) -> nn.Module:
    """Fill every BN layer's running statistics from ``batches``: train-mode passes without gradients, each
    layer's statistics the cumulative (equal-weight) average over the batches; then evaluation mode. The
    weights do not change. An initial net measured "at initialisation" is then the net with its BN."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    net.train()
    try:
        for x in batches:
            net(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum
    return net.eval()


def calibration_batches(train_x: torch.Tensor, mean: torch.Tensor, images: int = CALIBRATION_IMAGES,
                        batch_size: int = 128):
    """The first ``images`` training images, normalised as in training, un-augmented, in batches."""
    return list(data.eval_batches(train_x[:images], mean, batch_size, torch.device("cpu")))


# -- lesions --------------------------------------------------------------------------------------------

@torch.no_grad()
def _error(net, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, ex: Execution, batch_size: int) -> float:
    from bench.steps import autocast

    wrong = 0
    cpu = torch.device("cpu")
    for i, xb in enumerate(data.eval_batches(x, mean, batch_size, cpu, ex.channels_last)):
        with autocast(ex.amp, cpu):
            wrong += int((net(xb).argmax(1) != y[i * batch_size: i * batch_size + len(xb)]).sum())
    return wrong / len(x)


def lesion_ks(n: int) -> list[int]:
    """The numbers k of blocks deleted together: every k up to 8, then powers of two and n."""
    return sorted({k for k in range(1, min(n, 8) + 1)} | {2 ** i for i in range(4, 16) if 2 ** i < n} | {n}) if n else []


def lesion_sets(same: list[int], seed: int, k: int, draws: int) -> list[tuple[int, ...]]:
    """``draws`` random sets of k blocks out of ``same``, from a generator seeded by (seed, k); all of
    them, once each, where there are no more than ``draws``."""
    if math.comb(len(same), k) <= draws:
        return [tuple(c) for c in combinations(same, k)]
    g = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return [tuple(sorted(same[j] for j in torch.randperm(len(same), generator=g)[:k].tolist())) for _ in range(draws)]


def lesion_errors(net, x, y, mean, *, seed: int, draws: int = LESION_DRAWS, ex: Execution | None = None,
                  batch_size: int = 1000) -> list[dict]:
    """Rows (see the module docstring): ``mode`` intact | single | random, ``position`` same | downsampling,
    ``k`` blocks deleted, ``draw``, ``blocks`` (the deleted block indices, as text), ``error``."""
    ex = ex or Execution()
    net = net.eval()
    fmt = torch.channels_last if ex.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    blocks = resnet.blocks(net)
    same = [i for i, b in enumerate(blocks) if not resnet.changes_shape(b)]
    down = [i for i, b in enumerate(blocks) if resnet.changes_shape(b) and resnet.deletable(b)]

    def row(mode, position, drop, draw=0):
        err = _error(resnet.lesioned(net, drop) if drop else net, x, y, mean, ex, batch_size)
        return dict(mode=mode, position=position, k=len(drop), draw=draw, blocks=",".join(map(str, drop)), error=err)

    rows = [row("intact", "none", [])]
    rows += [row("single", "same", [i]) for i in same] + [row("single", "downsampling", [i]) for i in down]
    for k in lesion_ks(len(same)):
        rows += [row("random", "same", list(s), d) for d, s in enumerate(lesion_sets(same, seed, k, draws))]
    return rows


# -- shattered gradients ------------------------------------------------------------------------------

def line_gradients(net, x0: torch.Tensor, *, steps: int = LINE_STEPS, step: float = LINE_STEP,
                   seed: int = 0) -> torch.Tensor:
    """(2 steps + 1, D): the input gradients of z_c - mean_j z_j at x0 + t step u, t = -steps..steps
    (row ``steps`` is the image itself); see the module docstring."""
    net = net.eval()
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(x0.shape, generator=g)
    u *= u.numel() ** 0.5 / u.norm()  # one unit of norm per pixel
    t = torch.arange(-steps, steps + 1, dtype=x0.dtype)
    points = (x0[None] + step * t[:, None, None, None] * u[None]).requires_grad_(True)
    with torch.no_grad():
        cls = int(net(x0[None]).argmax(1))
    z = net(points)
    (z[:, cls] - z.mean(1)).sum().backward()  # eval mode: each point's output depends on that point only
    return points.grad.flatten(1)


def correlation_by_distance(grads: torch.Tensor) -> list[float]:
    """C(k), k = 0..T, of ``line_gradients`` output (2T + 1 rows, the image in the middle): the mean of the
    two directions' cosines; NaN where either point's gradient is exactly zero (a dead region, or a zero
    classifier), since its cosine is undefined."""
    g = grads.double()
    mid = (len(g) - 1) // 2
    norms = g.norm(dim=1)
    # 0/0 = NaN where a gradient is exactly zero (a net whose classifier starts at zero, as Fixup's): no
    # direction to correlate, where cosine_similarity's eps would report 0, i.e. "shattered"
    cos = (g @ g[mid]) / (norms * norms[mid])  # (2T + 1,)
    return [float((cos[mid + k] + cos[mid - k]) / 2) for k in range(mid + 1)]


class _Finished(nn.Module):
    """``net`` after a Norm's last step (PLN), so that input gradients are taken where the line is drawn: in
    the normalised images' space, as for every other normalisation."""

    def __init__(self, net: nn.Module, norm: data.Norm):
        super().__init__()
        self.net, self.norm = net, norm

    def forward(self, x):
        return self.net(self.norm.finish(x))


def shattered(net, x: torch.Tensor, mean: "torch.Tensor | data.Norm", *, images: int = 8, steps: int = LINE_STEPS,
              step: float = LINE_STEP) -> list[dict]:
    """Rows image, distance (k h, per pixel), correlation C(k h) for the first ``images`` test images."""
    norm = data.as_norm(mean)
    normed = norm.pixels(x[:images])
    net = _Finished(net, norm) if norm.pln else net
    rows = []
    for i, img in enumerate(normed):
        for k, c in enumerate(correlation_by_distance(line_gradients(net, img, steps=steps, step=step, seed=i))):
            rows.append(dict(image=i, k=k, distance=k * step, correlation=c))
    return rows


# -- the command ----------------------------------------------------------------------------------------

def diagnose(results_dir: Path, runs: pd.DataFrame, *, data_root=None, responses: bool = True, lesion: bool = True,
             shattered_: bool = True, max_images: int | None = None, draws: int = LESION_DRAWS, images: int = 8,
             progress: bool = True, notes: list | None = None, ex: Execution | None = None,
             log=None) -> dict[str, pd.DataFrame]:
    """Write analysis/responses.parquet, lesion.parquet and shattered.parquet for the folder's ok runs; return them.

    ``max_images``: test images for the lesions (None: the whole test set); ``images``: for the shattered
    gradients. ``ex``: how evaluation runs (on the CPU; bf16 and channels_last where the CPU has native bf16,
    as training does). ``log``: where to say what bounds the time, and, without a terminal, each run's progress.

    Resumable: each run's rows go to analysis/parts/ as soon as they are computed, under a key of the
    options that made them; a diagnose interrupted and started again with the same options takes the
    runs it finished from there. The files are written (atomically) once every run is done, and
    the parts are then removed: until then, files of an earlier diagnose stay as they were."""
    from tqdm.auto import tqdm

    from bench.tuning import at_chosen

    ex = ex or Execution.for_device("cpu")
    results_dir = Path(results_dir)
    runs = at_chosen(runs)  # a tuned folder: the runs its results are (each cell at its chosen lr), not its grid
    parts = results_dir / "analysis" / "parts"
    options = dict(responses=responses, lesion=lesion, shattered_=shattered_, max_images=max_images, draws=draws,
                   images=images)
    key = _options_key(**options, amp=ex.amp, channels_last=ex.channels_last)
    found: dict[str, list] = dict(responses=[], lesion=[], shattered=[])
    done = []
    n = int((runs["status"] == "ok").sum()) if "status" in runs else len(runs)
    lines = progress and log is not None and not sys.stderr.isatty()  # a line per run where no bar is drawn
    if log is not None:
        log(_cost_line(n, **options))
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="diagnose", unit="run", disable=None if progress else True)
    for run, spec, net, x, y, mean, train_x in _saved_nets(results_dir, runs, data_root, notes, "diagnose",
                                                           tree_images=max_images or TREE_IMAGES):
        part = parts / f"{run['run_id']}-{key}.json"
        mine = _read_part(part)
        if mine is None:
            mine = _diagnose_one(run, spec, net, x, y, mean, train_x, ex=ex, notes=notes, **options)
            records.atomic_write(part, lambda tmp: tmp.write_text(json.dumps(mine)))
        done.append(part)
        for name in found:
            found[name] += mine[name]
        bar.update()
        if lines:
            k, elapsed = len(done), time.perf_counter() - t0
            log(f"[{k}/{n}] {run['run_id']} diagnosed; {duration(elapsed)} so far, about "
                f"{duration(elapsed / k * (n - k))} left")
    bar.close()
    out = {}
    for name, rows in found.items():
        if rows:
            out[name] = pd.DataFrame(rows)
            records.write_table(out[name], name, results_dir / "analysis" / f"{name}.parquet")
    for part in done:  # every run is in the files now
        part.unlink(missing_ok=True)
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
    return out


def _cost_line(n: int, *, responses, lesion, shattered_, max_images, draws, images) -> str:
    """What a diagnose's time grows with, per run, and which option bounds each part."""
    return f"diagnose {n} runs; what takes the time, per run: " + "; ".join(filter(None, [
        "the layer responses (Fig. 7) pass the run's test images once" if responses else "",
        f"the lesion study evaluates {'the first ' + str(max_images) + ' test images' if max_images else 'the whole test set'} "
        f"(--max-images) once intact, once per deletable block and {draws} times per number of blocks deleted "
        f"(--draws)" if lesion else "",
        f"shattered gradients take {images} images (--shattered-images) x {2 * LINE_STEPS + 1} input "
        f"gradients, at initialisation and trained, whatever --max-images" if shattered_ else ""]))


def _read_part(part: Path) -> dict | None:
    """A run's rows from an interrupted diagnose with the same options, or None (none, or damaged: redo it)."""
    if not part.exists():
        return None
    try:
        rows = json.loads(part.read_text())
        return {name: rows[name] for name in ("responses", "lesion", "shattered")}
    except (ValueError, KeyError, TypeError):
        return None


def _diagnose_one(run, spec: RunSpec, net, x, y, mean, train_x, *, responses: bool, lesion: bool, shattered_: bool,
                  max_images: int | None, draws: int, images: int, ex: Execution, notes: list | None) -> dict:
    """One run's rows: layer responses on its test images, lesions on ``max_images`` of them, shattered
    gradients at initialisation (BN calibrated on training images) and trained."""
    mine = dict(responses=[], lesion=[], shattered=[])
    if responses:
        mine["responses"] = response_rows(run, spec, net, x, mean)
    x, y = (x, y) if max_images is None else (x[:max_images], y[:max_images])
    if lesion:
        try:
            batch = max(1, 1000 * 32 * 32 // (x.shape[-2] * x.shape[-1]))  # 1000 CIFAR images' pixels
            mine["lesion"] = [_ids(run, spec) | dict(images=len(x), amp=ex.amp) | r
                              for r in lesion_errors(net, x, y, mean, seed=spec.seed, draws=draws, ex=ex,
                                                     batch_size=batch)]
        except ValueError as e:  # a block that cannot be deleted as such (pre-activation with projections)
            if notes is not None:
                notes.append(f"lesion: {run['run_id']} left out: {e}")
    if shattered_:
        torch.manual_seed(spec.seed)  # the trainer's initialisation, from the run's seed
        init = build_net(spec, net.fc.out_features, data.as_norm(mean).channels(x.shape[1]))
        calibrate_bn(init, calibration_batches(train_x, mean))
        bn = {"init": f"calibrated on {min(CALIBRATION_IMAGES, len(train_x))} training images",
              "trained": "running averages of training"}
        for state, model in (("init", init), ("trained", net)):
            for r in shattered(model, x, mean, images=images):
                mine["shattered"].append(_ids(run, spec) | dict(state=state, bn_statistics=bn[state]) | r)
    return mine


def _options_key(**options) -> str:
    """A short name for the options that decide a diagnose's rows (and this module's fixed settings)."""
    fixed = dict(calibration=CALIBRATION_IMAGES, line_steps=LINE_STEPS, line_step=LINE_STEP, tree_images=TREE_IMAGES)
    return hashlib.blake2b(json.dumps(options | fixed, sort_keys=True).encode(), digest_size=6).hexdigest()
