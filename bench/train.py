"""Training: run_one(spec) trains one network and writes its records; resumable from a checkpoint.

The step loop never reads a value back to the host: loss and error are summed on the device and
read at evaluation points, which are also the only places the clock is read (after a
synchronize), so evaluation is excluded from the throughput figures.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback
import warnings
from pathlib import Path

import pandas as pd
import torch

import resnet
from bench import claims, data, records
from bench.specs import Execution, RunSpec
from bench.steps import (TrainStep, autocast, current_lr, load_optimizer_state, make_optimizer, peak_memory,
                         reset_peak_memory, set_lr, sync)

class Progress:
    """A tqdm bar on a terminal; silent otherwise (tqdm disables itself when stdout is no TTY)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                        disable=None if enabled else True, dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        self.bar.update(n)

    def show(self, **values) -> None:
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()



@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, ex: Execution, device) -> float:
    """Top-1 error (fraction) on un-augmented images, with large batches."""
    if len(x) == 0:
        return float("nan")
    model.eval()
    wrong = torch.zeros((), device=device, dtype=torch.long)
    y = y.to(device)
    for i, xb in enumerate(data.eval_batches(x, mean, ex.eval_batch_size, device, ex.channels_last)):
        with autocast(ex.amp, device):
            pred = model(xb).argmax(1)
        wrong += (pred != y[i * ex.eval_batch_size : i * ex.eval_batch_size + len(xb)]).sum()
    model.train()
    return wrong.item() / len(x)


@torch.no_grad()
def layer_rows(model: torch.nn.Module, opt: torch.optim.Optimizer, run_id: str, iteration: int) -> list[dict]:
    """Each weighted layer's weight norm, the norm of the last step's gradient, and the last update
    relative to the weight (SGD's update is lr x the momentum buffer, weight decay included)."""
    lr = float(opt.param_groups[0]["lr"])
    rows = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for i, (name, m) in enumerate(layers, 1):
        w = m.weight
        buf = opt.state.get(w, {}).get("momentum_buffer")
        wn = float(w.norm())
        rows.append(dict(run_id=run_id, iteration=iteration, layer=i, layer_name=name, weight_norm=wn,
                         grad_norm=float(w.grad.norm()) if w.grad is not None else float("nan"),
                         update_ratio=lr * float(buf.norm()) / wn if buf is not None and wn else float("nan")))
    return rows


def timed_windows(windows: list[dict], attempt: int) -> list[dict]:
    """The timing windows a run's throughput is taken from.

    Only this attempt's (an earlier attempt may have run with another execution, device or
    machine), and without its first window, which holds the warm-up (cuDNN autotuning,
    compilation, graph capture), unless it is the only one.
    """
    mine = [w for w in windows if w.get("attempt", 0) == attempt]
    return mine[1:] if len(mine) > 1 else mine


def run_one(spec: RunSpec, out: Path, ex: Execution, *, data_root=None, download: bool = False,
            progress: bool = True) -> dict:
    """Train ``spec`` and write runs/, curves/ and weights/ under ``out``; return the run row.

    The run is claimed first (bench.claims): if another live trainer holds it, or it was recorded
    meanwhile, claims.Skip is raised and nothing is written. A checkpoint in ckpt/ (from an
    interrupted earlier attempt) is resumed. A non-finite loss ends the run with status "diverged".
    Other exceptions propagate (the sweep records them as "failed").
    """
    out = Path(out)
    claim = claims.Claim(out, spec.run_id)
    claim.acquire()
    try:
        done = records.recorded(out, spec.run_id)
        if done is not None and done["status"] in records.DONE:
            raise claims.Skip(f"{spec.run_id} is already recorded ({done['status']})")
        return _train(spec, out, ex, claim, data_root=data_root, download=download, progress=progress)
    finally:
        claim.release()


def _train(spec: RunSpec, out: Path, ex: Execution, claim: claims.Claim, *, data_root, download: bool,
           progress: bool) -> dict:
    p = records.paths(out, spec.run_id)
    device = torch.device(ex.device)
    torch.backends.cudnn.benchmark = ex.cudnn_benchmark
    memory_tracked = reset_peak_memory(device)
    r, arch = spec.recipe, spec.arch

    arrays = data.load(spec.dataset, data_root, download)
    parts = data.split(arrays, r.val_size, r.train_size)
    train_x, train_y = parts["train"]
    mean = data.pixel_mean(train_x)
    # evaluation sets live on the device too: no host-to-device copies at evaluation points
    val_x, val_y = (t.to(device) for t in parts["val"])
    test_x, test_y = (t[: r.test_size].to(device) for t in parts["test"])
    loader = data.DeviceLoader(train_x, train_y, mean, batch_size=r.batch_size, seed=spec.seed, device=device,
                               channels_last=ex.channels_last)

    torch.manual_seed(spec.seed)
    model = resnet.build(spec.model, arrays.num_classes, width=spec.width, shortcut=spec.shortcut,
                         in_channels=arrays.image_shape[0])
    params, macs = resnet.count_params(model), resnet.count_macs(model, arrays.image_shape)
    model = model.to(device, memory_format=torch.channels_last if ex.channels_last else torch.contiguous_format)
    opt = make_optimizer(model, r.lr, r.momentum, r.weight_decay, device)

    start, curves, windows, layers, wall_before, attempt = 0, [], [], [], 0.0, 0
    ck = read_checkpoint(p["ckpt"], spec, device)
    if ck is not None:
        model.load_state_dict(ck["model"])
        load_optimizer_state(opt, ck["optimizer"])
        torch.set_rng_state(ck["rng"]["torch"].cpu())  # map_location moved it; the CPU RNG wants it back
        if device.type == "cuda" and "cuda" in ck["rng"]:
            torch.cuda.set_rng_state(ck["rng"]["cuda"].cpu(), device)
        start, curves, windows, wall_before = ck["iteration"], ck["curves"], ck["windows"], ck["wall_s"]
        layers = ck.get("layers", [])  # checkpoints of earlier versions have none
        attempt = 1 + max((w.get("attempt", 0) for w in windows), default=-1)
    step = TrainStep(model, opt, execution=ex.execution, amp=ex.amp, device=device)

    bar = Progress(r.iterations, start, spec.model, progress)
    status, error = "ok", None
    t_wall = t_beat = time.perf_counter()
    sync(device)
    t0 = time.perf_counter()
    train_time = curves[-1]["train_time_s"] if curves else 0.0
    model.train()
    lr = None
    for it in range(start, r.iterations):
        if r.lr_at(it, arch.depth) != lr:
            lr = r.lr_at(it, arch.depth)
            set_lr(opt, lr)
        step(*loader.batch(it))
        bar.step()
        if (it + 1) % r.eval_every and it + 1 != r.iterations:
            continue
        # --- evaluation point: the only host syncs of the loop ---
        sync(device)
        window = time.perf_counter() - t0
        train_time += window
        train_loss, train_err, seen = step.read()
        windows.append(dict(attempt=attempt, steps=seen // r.batch_size, seconds=window, img_per_s=seen / window))
        if not math.isfinite(train_loss):
            status, error = "diverged", f"non-finite training loss at iteration {it + 1}"
            curves.append(dict(run_id=spec.run_id, iteration=it + 1, epoch=(it + 1) / loader.steps_per_epoch,
                               lr=current_lr(opt), train_loss=train_loss, train_err=train_err, val_err=float("nan"),
                               test_err=float("nan"), train_time_s=train_time, img_per_s=seen / window))
            break
        layers += layer_rows(model, opt, spec.run_id, it + 1)  # before evaluation: grads of the last step
        val_err = evaluate(model, val_x, val_y, mean, ex, device)
        test_err = evaluate(model, test_x, test_y, mean, ex, device)
        curves.append(dict(run_id=spec.run_id, iteration=it + 1, epoch=(it + 1) / loader.steps_per_epoch,
                           lr=current_lr(opt),
                           train_loss=train_loss, train_err=train_err, val_err=val_err, test_err=test_err,
                           train_time_s=train_time, img_per_s=seen / window))
        bar.show(loss=f"{train_loss:.3f}", err=f"{train_err:.3f}", val=f"{val_err:.3f}", img_s=f"{seen / window:.0f}")
        claim.beat(time.perf_counter() - t_beat)  # raises claims.Claimed if another trainer took the run over
        t_beat = time.perf_counter()
        if it + 1 < r.iterations:
            records.save_torch(dict(spec=spec.to_json(), model=model.state_dict(), optimizer=opt.state_dict(),
                                    rng=_rng_state(device), iteration=it + 1, curves=curves, layers=layers,
                                    windows=windows, wall_s=wall_before + time.perf_counter() - t_wall), p["ckpt"])
        sync(device)
        t0 = time.perf_counter()
    bar.close()
    wall = wall_before + time.perf_counter() - t_wall

    cdf = pd.DataFrame(curves, columns=records.CURVE_COLUMNS)
    timed = timed_windows(windows, attempt)
    # val_err is NaN throughout with --val-size 0, test_err only at a divergence point
    validated, tested = cdf[cdf["val_err"].notna()], cdf[cdf["test_err"].notna()]
    row = spec.flat() | dict(
        params=params, macs=macs, status=status, error=error,
        iterations_done=int(cdf["iteration"].max()) if len(cdf) else 0,
        resumed_from=start,  # the iteration this (last) attempt continued from; 0 for an uninterrupted run
        final_train_loss=cdf["train_loss"].iloc[-1] if len(cdf) else float("nan"),
        final_train_err=cdf["train_err"].iloc[-1] if len(cdf) else float("nan"),
        final_val_err=validated["val_err"].iloc[-1] if len(validated) else float("nan"),
        final_test_err=tested["test_err"].iloc[-1] if len(tested) else float("nan"),
        best_train_err=cdf["train_err"].min() if len(cdf) else float("nan"),
        best_val_err=validated["val_err"].min() if len(validated) else float("nan"),
        # test error at the best validation point: model selection never looks at the test set
        test_err_at_best_val=validated.loc[validated["val_err"].idxmin(), "test_err"] if len(validated) else float("nan"),
        best_test_err=tested["test_err"].min() if len(tested) else float("nan"),
        train_img_per_s=statistics.median(w["img_per_s"] for w in timed) if timed else float("nan"),
        step_time_ms=1e3 * statistics.median(w["seconds"] / max(w["steps"], 1) for w in timed) if timed else float("nan"),
        timed_windows=len(timed),
        train_time_s=train_time, wall_time_s=wall,
        peak_memory_bytes=peak_memory(device) if memory_tracked else None,
        amp=ex.amp, channels_last=ex.channels_last, execution=ex.execution, cudnn_benchmark=ex.cudnn_benchmark,
        train_path=f"device-loader+{ex.execution}", data_source=arrays.source, data_sha256=arrays.sha256,
        data_official=arrays.official,
    ) | records.environment(ex.device)
    claim.beat(time.perf_counter() - t_beat)  # still ours: nobody else writes this run's records
    # weights and curves first, the run row last: a row in runs/ means the run is complete
    records.save_torch(dict(spec=spec.to_json(), model=model.state_dict(), num_classes=arrays.num_classes,
                            in_channels=arrays.image_shape[0]), p["weights"])
    records.write_parquet(cdf, p["curves"])
    records.write_parquet(pd.DataFrame(layers, columns=records.LAYER_COLUMNS), p["layers"])
    records.write_parquet(pd.DataFrame([row]), p["run"])
    p["ckpt"].unlink(missing_ok=True)
    return row


CHECKPOINT_KEYS = {"spec", "model", "optimizer", "rng", "iteration", "curves", "windows", "wall_s"}


def read_checkpoint(path: Path, spec: RunSpec, device: torch.device) -> dict | None:
    """The run's checkpoint, or None to start from scratch.

    A checkpoint that cannot be read (truncated by a full disk or a killed copy, or refused because
    only a code-running load could read it) is moved aside to ``<name>.corrupt``, kept for
    inspection, and the run restarts with a warning: a damaged file never blocks its run for good.
    """
    if not path.exists():
        return None
    try:
        ck = records.load_torch(path, map_location=device)
        if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= ck.keys():
            raise records.UnreadableFile(f"{path} is not a resbench checkpoint (keys missing)")
    except records.UnreadableFile as e:
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        warnings.warn(f"{e}; moved it to {aside} and training {spec.run_id} from scratch", stacklevel=2)
        return None
    if RunSpec.from_dict(ck["spec"]).to_dict() != spec.to_dict():
        raise RuntimeError(f"checkpoint {path} belongs to another spec; delete it to start over")
    return ck


def _rng_state(device: torch.device) -> dict:
    """The generators a resumed run must continue: the CPU's, and the device's on CUDA (nothing in the
    step draws from it today, but dropout or on-device augmentation would)."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def record_failure(spec: RunSpec, out: Path, ex: Execution, exc: BaseException) -> dict:
    """Write (and return) the row of a run that raised: its spec, the error text and the environment."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    row = spec.flat() | dict(status="failed", error=text) | records.environment(ex.device)
    records.write_parquet(pd.DataFrame([row]), records.paths(Path(out), spec.run_id)["run"])
    return row
