"""Throughput profiling: training-step and inference img/s over a grid of configurations.

Grid: models x batch sizes x precision (fp32, tf32, bf16 autocast) x memory format (nchw,
channels_last) x execution (eager, compile, cudagraph) x mode (train, infer) x group size x input
padding of a group's members (0: none, 4 or 8 channels: resnet.group).

A group size K > 1 times a run group (bench.fuse): K copies of the model (seeds 0..K-1) as one
grouped network, each member with its own batch of ``batch_size`` images; img/s is the group's
aggregate (K x batch_size images per step), and MFU counts all of them.

Timing: warm-up steps first (cuDNN autotuning, compilation, graph capture), then ``repeats``
blocks of steps, each block timed with CUDA events (on the CPU, a wall clock) around the whole
block, never per step; the number of steps per block is chosen from the warm-up so that a block
lasts about ``block_s`` seconds. We report the median and the spread over blocks.

MFU = (6 x multiply-adds per image for a training step, 2 x for inference) x img/s / the
device's dense peak at that precision. Peaks come from the vendor datasheets (table below); an
unknown device leaves MFU empty.

``pipeline_comparison`` times the usual pipeline (torchvision DataLoader with PIL transforms and
worker processes, eager fp32, ``.item()`` every step) against ours on the same model and data.
"""
from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F

import resnet
from bench import data, env
from resnet.group import member_major
from bench.fuse import Members
from bench.specs import PAD_INPUTS
from bench.steps import TrainStep, autocast, make_optimizer, sync
# what a profile is once measured (tables, figures, --against, reading one back) lives in bench.profile_tables
from bench.profile_tables import DEFAULTS, FORMATS, MODES

PRECISIONS = ("fp32", "tf32", "bf16")

# dense peak TFLOP/s by precision (vendor datasheets; SXM parts unless named)
PEAK_TFLOPS = {
    "H100 PCIe": {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_flops(gpu_name: str | None, precision: str) -> float | None:
    """Dense peak FLOP/s of a GPU at a precision, or None when unknown (CPUs included)."""
    if not gpu_name:
        return None
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # most specific name first
        if all(part in gpu_name for part in key.split()):
            return PEAK_TFLOPS[key][precision] * 1e12
    return None


def resolve_grid(device: str, **given) -> dict:
    """The grid to measure: ``given`` values (None = the device's default), de-duplicated and checked.

    Raises ValueError naming the bad value and the valid ones.
    """
    from bench.steps import EXECUTIONS

    cuda = device.startswith("cuda")
    grid = {k: (given.get(k) if given.get(k) is not None else v) for k, v in DEFAULTS["cuda" if cuda else "cpu"].items()}
    grid.setdefault("modes", MODES)
    if given.get("modes") is not None:
        grid["modes"] = given["modes"]
    for key in ("models", "batch_sizes", "precisions", "formats", "executions", "modes", "group_sizes", "pad_inputs"):
        grid[key] = tuple(dict.fromkeys(grid[key]))  # a repeated value would be timed twice
    if any(k > 1 for k in grid["group_sizes"]):
        bad = [m for m in grid["models"] if not resnet.groupable(m)]
        if bad:
            raise ValueError(f"--group-sizes above 1 need CIFAR nets with shortcut A (resnet{{d}}, plain{{d}}); "
                             f"not {', '.join(bad)}")
    for key, allowed in (("precisions", PRECISIONS), ("formats", FORMATS), ("executions", EXECUTIONS), ("modes", MODES),
                         ("pad_inputs", PAD_INPUTS)):
        bad = [v for v in grid[key] if v not in allowed]
        if bad:
            raise ValueError(f"--{key}: {', '.join(bad)} not one of {', '.join(allowed)}")
    if "cudagraph" in grid["executions"] and not cuda:
        raise ValueError("--executions: cudagraph needs CUDA")
    for m in grid["models"]:
        resnet.parse(m)
    return grid


def default_name(device: str) -> str:
    """A file name that says where and with what it was measured, e.g. profile-h200-torch2.11.0."""
    tag = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    tag = tag.lower().replace("nvidia ", "").replace(" ", "-")
    return f"profile-{tag}-torch{torch.__version__.split('+')[0]}"


@dataclass(frozen=True)
class Config:
    model: str
    batch_size: int
    precision: str = "bf16"
    memory_format: str = "channels_last"
    execution: str = "eager"
    mode: str = "train"
    group_size: int = 1
    pad_input: int = 0  # a group's members' input channels after zero-padding (0: none)
    image_size: int = 32  # square inputs; 224 times the ImageNet-style family with its 7x7 stem, as on ImageNet


def _set_precision(precision: str) -> None:
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def _timer(device: torch.device):
    """A function that times ``fn`` run ``n`` times, in seconds, around the whole block."""
    if device.type == "cuda":
        def timed(fn, n):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn, n):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            return time.perf_counter() - t
    return timed


def _inference_fn(net, x, execution: str, amp: bool, device: torch.device):
    net.eval()
    fwd = torch.compile(net) if execution == "compile" else net

    def infer():
        with torch.no_grad(), autocast(amp, device, cache=execution != "cudagraph"):
            return fwd(x)

    if execution != "cudagraph":
        return infer
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            infer()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        infer()
    return graph.replay


def measure(cfg: Config, device: torch.device, *, warmup: int = 5, repeats: int = 5, block_s: float = 0.2,
            max_steps: int = 500) -> dict:
    """Time one configuration; returns a row (status ok / oom / error, never raises for these)."""
    arch = resnet.parse(cfg.model)
    row = dict(model=cfg.model, family=arch.family, kind=arch.kind, depth=arch.depth, residual=arch.residual,
               batch_size=cfg.batch_size, precision=cfg.precision, memory_format=cfg.memory_format,
               execution=cfg.execution, mode=cfg.mode, group_size=cfg.group_size, pad_input=cfg.pad_input,
               image_size=cfg.image_size, status="ok", error=None)
    k = cfg.group_size
    fmt = torch.channels_last if cfg.memory_format == "channels_last" else torch.contiguous_format
    try:
        _set_precision(cfg.precision)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        nets = []
        stem = "imagenet" if arch.family == "imagenet" and cfg.image_size >= 64 else "cifar"
        for seed in range(k):
            torch.manual_seed(seed)
            nets.append(resnet.build(cfg.model, stem=stem))
        shape = (3, cfg.image_size, cfg.image_size)
        row.update(params=resnet.count_params(nets[0]), macs=resnet.count_macs(nets[0], shape), stem=stem)  # per member
        net = Members(nets, pad_input=cfg.pad_input or None).model.to(device, memory_format=fmt)  # the net, or the group
        x = member_major(torch.randn(k, cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device))
        x = x.contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (cfg.batch_size, k) if k > 1 else (cfg.batch_size,), device=device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        amp = cfg.precision == "bf16"
        if cfg.mode == "train":
            step = TrainStep(net, make_optimizer(net, 0.01, 0.9, 1e-4, device), execution=cfg.execution, amp=amp,
                             device=device, members=k)
            fn = lambda: step(x, y)  # noqa: E731
        else:
            fn = _inference_fn(net, x, cfg.execution, amp, device)
        timed = _timer(device)
        t_warm = timed(fn, warmup)
        # estimate from the last warm-up step alone: the first ones include compilation
        per_step = timed(fn, 1)
        steps = int(min(max_steps, max(3, block_s / max(per_step, 1e-6))))
        times = [timed(fn, steps) for _ in range(repeats)]
    except torch.cuda.OutOfMemoryError as e:
        row.update(status="oom", error=str(e).splitlines()[0])
        return row
    except Exception as e:  # a configuration this torch/device cannot run is a row, not a crash
        row.update(status="error", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return row
    finally:
        sync(device)
    rates = [steps * cfg.batch_size * k / t for t in times]  # a group's aggregate
    flops_per_img = (6 if cfg.mode == "train" else 2) * row["macs"]
    peak = peak_flops(torch.cuda.get_device_name(device) if device.type == "cuda" else None, cfg.precision)
    med = statistics.median(rates)
    row.update(img_per_s=med, img_per_s_min=min(rates), img_per_s_max=max(rates),
               step_ms=1e3 * cfg.batch_size * k / med, steps_per_block=steps, repeats=repeats, warmup_steps=warmup,
               warmup_s=t_warm, peak_memory_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
               mfu=flops_per_img * med / peak if peak else None)
    return row


def profile(models, batch_sizes, precisions=("bf16",), formats=("channels_last",), executions=("eager",),
            modes=MODES, group_sizes=(1,), pad_inputs=(0,), image_size: int = 32, device: str = "cpu", log=print,
            **timing) -> pd.DataFrame:
    """Measure the whole grid. Batch sizes run smallest first; after an OOM the larger ones of that
    configuration are skipped (recorded as oom) instead of being tried. Input padding applies to
    groups only (a lone net is never padded), so groups of one are timed unpadded once."""
    dev = torch.device(device)
    rows, oom = [], set()
    for model, precision, fmt, execution, mode, k, pad in itertools.product(models, precisions, formats, executions,
                                                                             modes, group_sizes, pad_inputs):
        if k == 1 and pad != pad_inputs[0]:
            continue  # a lone net is timed once, unpadded
        pad = pad if k > 1 else 0
        for bs in sorted(batch_sizes):
            key = (model, precision, fmt, execution, mode, k, pad)
            cfg = Config(model, bs, precision, fmt, execution, mode, k, pad, image_size)
            if key in oom:
                row = dict(model=model, batch_size=bs, precision=precision, memory_format=fmt, execution=execution,
                           mode=mode, group_size=k, pad_input=pad, status="oom",
                           error="skipped: a smaller batch ran out of memory")
            else:
                row = measure(cfg, dev, **timing)
                if row["status"] == "oom":
                    oom.add(key)
            rows.append(row)
            log(_line(row))
    machine = env.environment(device)
    return pd.DataFrame([r | machine for r in rows])


def _line(r: dict) -> str:
    group = f" x{r['group_size']}" if r.get("group_size", 1) > 1 else ""
    group += f" pad{r['pad_input']}" if r.get("pad_input") else ""
    head = (f"{r['model'] + group:<10} {r['mode']:<5} bs {r['batch_size']:<5} {r['precision']:<4} "
            f"{r['memory_format']:<13} {r['execution']:<9}")
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['error']}"
    mfu = f"  MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
    mem = f"  {r['peak_memory_bytes'] / 2**20:.0f} MiB" if r.get("peak_memory_bytes") else ""
    return f"{head} {r['img_per_s']:>10.0f} img/s (min {r['img_per_s_min']:.0f}, max {r['img_per_s_max']:.0f}){mfu}{mem}"


class _PILDataset(torch.utils.data.Dataset):
    """What torchvision's CIFAR10 does per item: uint8 array -> PIL image -> transforms."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform):
        self.x = x.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) for PIL
        self.y = y.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i])), self.y[i]


def pipeline_comparison(model: str = "resnet20", batch_size: int = 128, device: str = "cpu", *, data_root=None,
                        workers: int = 2, steps: int = 50, warmup: int = 5, execution: str | None = None,
                        log=print) -> pd.DataFrame:
    """img/s of the common pipeline against ours, same model, same data, same batch size."""
    import torchvision.transforms as T

    from bench.specs import Execution

    dev = torch.device(device)
    try:
        arrays, source = data.load("cifar10", data_root), "cifar10"
    except data.DataError:
        arrays, source = data.synthetic(), "synthetic"
    x, y = arrays.train_x[:45_000], arrays.train_y[:45_000]
    mean = (x.float().mean((0, 2, 3)) / 255).tolist()
    std = (x.float().std((0, 2, 3)) / 255).tolist()
    rows = []

    # -- the common pipeline ------------------------------------------------------------------
    _set_precision("fp32")
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    net = resnet.build(model).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(_PILDataset(x, y, tf), batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=dev.type == "cuda",
                                         persistent_workers=workers > 0)
    batches = iter(loader)

    def baseline_step():
        nonlocal batches
        try:
            xb, yb = next(batches)
        except StopIteration:
            batches = iter(loader)
            xb, yb = next(batches)
        xb, yb = xb.to(dev), yb.to(dev)
        loss = F.cross_entropy(net(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()  # the habitual per-step sync

    rows.append(_time_pipeline("baseline", baseline_step, dev, steps, warmup, batch_size,
                               "torchvision DataLoader + PIL transforms, "
                               f"{workers} workers, eager fp32 NCHW, .item() every step"))
    # drop the DataLoader's iterators so its worker processes stop before our path is timed
    loader = batches = None

    # -- ours -------------------------------------------------------------------------------------
    ex = Execution.for_device(device, execution=execution)
    torch.backends.cudnn.benchmark = ex.cudnn_benchmark
    torch.manual_seed(0)
    fmt = torch.channels_last if ex.channels_last else torch.contiguous_format
    net = resnet.build(model).to(dev, memory_format=fmt)
    dl = data.DeviceLoader(x, y, data.pixel_mean(x), batch_size=batch_size, seed=0, device=dev,
                           channels_last=ex.channels_last)
    step = TrainStep(net, make_optimizer(net, 0.01, 0.9, 1e-4, dev), execution=ex.execution, amp=ex.amp, device=dev)
    counter = itertools.count()
    rows.append(_time_pipeline("ours", lambda: step(*dl.batch(next(counter))), dev, steps, warmup, batch_size,
                               f"device-resident uint8 + batched augmentation, {'bf16' if ex.amp else 'fp32'} "
                               f"{'channels_last' if ex.channels_last else 'NCHW'}, {ex.execution}, no per-step sync"))
    df = pd.DataFrame(rows)
    df["speedup"] = df["img_per_s"] / df.loc[df["pipeline"] == "baseline", "img_per_s"].iloc[0]
    df = df.assign(model=model, batch_size=batch_size, data=source, mode="train-pipeline", status="ok")
    for r in df.to_dict("records"):
        log(f"{r['pipeline']:<9} {model} bs {batch_size}: {r['img_per_s']:.0f} img/s (x{r['speedup']:.2f})  [{r['pipeline_desc']}]")
    machine = env.environment(device)
    return pd.DataFrame([r | machine for r in df.to_dict("records")])


def _time_pipeline(name, fn, dev, steps, warmup, batch_size, desc) -> dict:
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(3):  # three blocks; median
        t = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    rates = [steps * batch_size / t for t in times]
    return dict(pipeline=name, pipeline_desc=desc, img_per_s=statistics.median(rates), img_per_s_min=min(rates),
                img_per_s_max=max(rates), steps_per_block=steps, repeats=3, warmup_steps=warmup)


def decode_rate(items, seconds: float = 10.0, workers: int = 0, batch_size: int = 64, decode_on: str = "workers",
                device: str = "cpu") -> dict:
    """Training images per second the pipeline reads, decodes and augments, over about ``seconds``: in this
    process (``workers`` = 0: one core, torch held to one thread), or ``workers`` DataLoader processes;
    with ``decode_on="device"`` the workers read and ``device`` decodes (timed to the device's last image)."""
    from bench.imagefolder import CROP, StreamLoader

    dev = torch.device(device)
    loader = StreamLoader(items, torch.zeros(3, CROP, CROP), batch_size=batch_size, seed=0, device=dev,
                          workers=workers, decode_on=decode_on)
    threads = torch.get_num_threads()
    if not workers:
        torch.set_num_threads(1)
    try:
        loader.batch(0)  # workers started, first batches in flight (and the device's decoder warmed up)
        sync(dev)
        n, start, it = 0, time.perf_counter(), 1
        while time.perf_counter() - start < seconds:
            n += len(loader.batch(it)[1])
            it += 1
        sync(dev)
        elapsed = time.perf_counter() - start
    finally:
        loader.close()  # before the next setting is timed
        torch.set_num_threads(threads)
    return dict(images=n, seconds=elapsed, img_per_s=n / elapsed, workers=workers, batch_size=batch_size,
                decode_on=decode_on, decode_device=str(dev) if decode_on == "device" else "cpu")


def decode_profile(root, workers=(0,), seconds: float = 10.0, device: str | None = None, batch_size: int = 64,
                   sample: int | None = 5000, log=print) -> pd.DataFrame:
    """img/s of the ImageNet-style training pipeline (read, decode, scale-augment, crop, flip: bench.imagefolder)
    on an ImageFolder tree, in this process on one core (0 workers) and with each number of worker processes;
    with ``device``, also decoded and augmented there, the most workers reading. The rate depends on the CPU
    and on the images (their size in bytes and pixels): on ``sample`` training images of the user's own tree
    drawn at random (seed 0; None: all), whose mean file size and pixels the rows record."""
    import numpy as np

    from bench import imagefolder as imf

    tree = imf.scan(root)
    items = tree.train
    if sample is not None and sample < len(items):
        items = items.take(np.sort(np.random.default_rng(0).choice(len(items), sample, replace=False)))
    batch_size = min(batch_size, len(items))
    probe = items.take(np.arange(0, len(items), max(1, len(items) // 200)))  # ~200 images: their size, in the rows
    kb = float(np.mean([len(imf.read_bytes(probe.path(i))) for i in range(len(probe))])) / 1024
    mpix = float(np.mean([imf.decode(probe.path(i)).shape[1:].numel() for i in range(len(probe))])) / 1e6
    settings = [("workers", w) for w in workers] + ([("device", max(workers))] if device else [])
    rows = []
    for decode_on, w in settings:
        r = decode_rate(items, seconds=seconds, workers=w, batch_size=batch_size, decode_on=decode_on,
                            device=device or "cpu")
        # per core: the workers' (or this process's) decoding; on the device, the cores only read
        per_core = r["img_per_s"] / (w or 1) if decode_on == "workers" else float("nan")
        rows.append(dict(mode="decode", status="ok", workers=w, decode_on=decode_on, decode_device=r["decode_device"],
                         img_per_s=r["img_per_s"], img_per_s_per_core=per_core, images=r["images"],
                         seconds=r["seconds"], batch_size=r["batch_size"], data=str(tree.root),
                         train_images=len(tree.train), sampled_images=len(items), mean_file_kb=kb,
                         mean_megapixels=mpix))
        where = f"on {r['decode_device']}, {w} worker(s) reading" if decode_on == "device" else f"{w} worker(s)"
        log(f"decode  {where}: {r['img_per_s']:.0f} img/s"
            + (f" ({per_core:.0f} per core)" if decode_on == "workers" else ""))
    log(f"on {len(items)} of the tree's {len(tree.train)} training images: {kb:.0f} KB and {mpix:.2f} megapixels "
        f"a file on average")
    machine = env.environment(device or "cpu")
    return pd.DataFrame([r | machine for r in rows])
