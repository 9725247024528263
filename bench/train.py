"""Training: run_group(specs) trains K runs of one shape in lockstep (bench.fuse), run_one(spec) one
run (a group of one), and each writes its own records; resumable from per-run checkpoints.

The step loop never reads a value back to the host: loss and error are summed on the device and
read at evaluation points, which are also the only places the clock is read (after a
synchronize), so evaluation is excluded from the throughput figures.
"""
from __future__ import annotations

import collections
import json
import math
import os
import statistics
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

import resnet
from bench import checkpoints, claims, data, ddp, env, fuse, outcome, probes, records, sources
from bench.fuse import Members
from bench.errors import Interrupted
from bench.progress import Progress, say
from bench.specs import Execution, RunSpec
from bench.steps import TrainStep, current_lr, make_optimizer, peak_memory, reset_peak_memory, set_lr, sync

SIGNAL_BATCHES = 2  # training batches each evaluation point's backward signals are averaged over


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
    """Train ``spec`` alone (a group of one, see run_group) and return its run row.

    Raises claims.Skip if another live trainer holds the run or it was recorded meanwhile.
    """
    result = run_group([spec], out, ex, data_root=data_root, download=download, progress=progress)[0]
    if isinstance(result, claims.Skip):
        raise result
    return result


def run_group(specs: list[RunSpec], out: Path, ex: Execution, *, data_root=None, download: bool = False,
              progress: bool = True) -> list[dict | claims.Skip]:
    """Train ``specs`` in lockstep as one grouped network (bench.fuse; one run is a group of one) and
    write each member's runs/, curves/, layers/ and weights/ under ``out``, as if it had run alone.

    Returns, per member, its run row or the claims.Skip that kept it out: each member is claimed
    first (bench.claims) and skipped if another live trainer holds it or it is already recorded.
    A member with a checkpoint in ckpt/ resumes from it (members whose checkpoints stand at
    different iterations train as separate groups, one after another). A member whose loss turns
    non-finite is recorded "diverged" and its slot masked; the others go on. Other exceptions
    propagate (the sweep records the members left without a record as "failed").
    """
    out = Path(out)
    place = ddp.place()
    if place.world > 1:
        _check_data_parallel(specs, ex, place)
        if not place.main:  # rank 0 claims the run; the others learn whether to train
            decision = ddp.from_main(None)
            if decision != "train":
                return [claims.Skip(decision)]
            return _train(specs, [None], out, ex, data_root=data_root, download=download, progress=False)
    if len(specs) > 1:
        keys = {fuse.group_key(s) for s in specs}
        if None in keys or len(keys) > 1:
            raise ValueError("a run group's runs must share family (CIFAR, post-activation, shortcut A), depth, "
                             f"width, data set and recipe; got {', '.join(s.run_id for s in specs)}")
        if len({s.run_id for s in specs}) < len(specs):
            raise ValueError("a run group holds each run once")
    results: list = [None] * len(specs)
    held, todo = [], []
    try:
        for i, spec in enumerate(specs):
            claim = claims.Claim(out, spec.run_id)
            try:
                claim.acquire()
            except claims.Skip as e:
                results[i] = e
                continue
            held.append(claim)
            done = records.recorded(out, spec.run_id)
            if done is not None and done["status"] in records.DONE:
                results[i] = claims.Skip(f"{spec.run_id} is already recorded ({done['status']})")
            else:
                records.start_attempt(out, spec.run_id)  # ours now: an earlier attempt's failure is no longer news
                todo.append((i, claim))
        if place.world > 1:
            ddp.from_main("train" if todo else str(results[0]))
        if todo:
            trained = _train([specs[i] for i, _ in todo], [c for _, c in todo], out, ex, data_root=data_root,
                             download=download, progress=progress)
            for (i, _), res in zip(todo, trained):
                results[i] = res
    finally:
        for claim in held:
            claim.release()
    return results


def _check_data_parallel(specs: list[RunSpec], ex: Execution, place: ddp.Place) -> None:
    """A data-parallel run is one run (no group), whose spec says the BN batch its processes give it."""
    if len(specs) != 1:
        raise ValueError("a data-parallel run trains one run, not a group (use --fuse off with several processes)")
    spec = specs[0]
    if ex.world_size != place.world:
        raise ValueError(f"this process is one of {place.world} (WORLD_SIZE), its execution says {ex.world_size}")
    want = None if ex.sync_bn else spec.recipe.batch_size // place.world
    if spec.bn_batch != want:
        raise ValueError(f"{spec.run_id}: {place.world} processes {'with' if ex.sync_bn else 'without'} --sync-bn "
                         f"normalise over {want or 'the whole batch of ' + str(spec.recipe.batch_size)} images, "
                         f"its spec says bn_batch={spec.bn_batch}")


def _train(specs: list[RunSpec], held: list[claims.Claim], out: Path, ex: Execution, *, data_root, download: bool,
           progress: bool) -> list[dict | claims.Skip]:
    device = torch.device(ex.device)
    torch.backends.cudnn.benchmark = ex.cudnn_benchmark
    d = sources.load(specs, ex, device, data_root, download)
    results: list = [None] * len(specs)
    where = {s.run_id: i for i, s in enumerate(specs)}
    # as many members at once as the device's free memory holds (bench.fuse.member_bytes)
    for piece in fuse.fit(specs, ex, fuse.free_memory(device) if len(specs) > 1 else None):
        idx = [where[s.run_id] for s in piece]
        for i, res in zip(idx, _fit(piece, [held[i] for i in idx], d, out, ex, progress=progress)):
            results[i] = res
    return results


def _fit(specs: list[RunSpec], held: list[claims.Claim], d: sources.Source, out: Path, ex: Execution, *,
         progress: bool) -> list[dict | claims.Skip]:
    """Train ``specs`` from their checkpoints, one group per iteration they stand at (lockstep needs one).

    A group that runs out of device memory (at graph capture or in any step: the estimate is only an
    estimate) is halved and each half trained in turn, from the checkpoints its members wrote; members
    recorded meanwhile (diverged) keep their record. No member is failed for its group's size; a lone
    run that does not fit fails as it would alone.
    """
    device = torch.device(ex.device)
    place = ddp.place()
    if place.main:  # rank 0 reads (and, if damaged, moves aside) the checkpoints; the others load what it found
        cks = [read_checkpoint(records.paths(out, s.run_id)["ckpt"], s, device) for s in specs]
    found = ddp.from_main([ck is not None for ck in cks] if place.main else None)
    if not place.main:
        cks = [checkpoints.load_torch(records.paths(out, s.run_id)["ckpt"], map_location=device) if f else None
               for s, f in zip(specs, found)]
    starts = [ck["iteration"] if ck else 0 for ck in cks]
    results: list = [None] * len(specs)
    for start in sorted(set(starts)):
        idx = [i for i, s in enumerate(starts) if s == start]
        try:
            trained = _lockstep([specs[i] for i in idx], [held[i] for i in idx], [cks[i] for i in idx], d, out, ex,
                                progress=progress)
        except torch.OutOfMemoryError as e:
            if len(idx) == 1:
                raise
            trained, why = None, str(e).splitlines()[0] if str(e) else "out of memory"
        if trained is None:  # outside the except block: its traceback (and the group's tensors) is gone
            _release_memory(device)
            half = (len(idx) + 1) // 2
            warnings.warn(f"a group of {len(idx)} ran out of device memory ({why}); training it as groups of "
                          f"{half} and {len(idx) - half}", stacklevel=2)
            trained = []
            for part in (idx[:half], idx[half:]):
                todo = [i for i in part if not _recorded(out, specs[i])]
                again = dict(zip(todo, _fit([specs[i] for i in todo], [held[i] for i in todo], d, out, ex,
                                            progress=progress))) if todo else {}
                trained += [again[i] if i in again else records.recorded(out, specs[i].run_id) for i in part]
        for i, res in zip(idx, trained):
            results[i] = res
    return results


def _recorded(out: Path, spec: RunSpec) -> bool:
    row = records.recorded(out, spec.run_id)
    return row is not None and row["status"] in records.DONE


def _release_memory(device: torch.device) -> None:
    """Give a failed group's memory back before its halves start (the caching allocator keeps it otherwise)."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Member:
    """One run of a group as it trains: its spec and claim, and the records it gathers (continued from its
    checkpoint): one object per member, where the trainer once kept a list per record kind."""

    spec: RunSpec
    claim: claims.Claim | None  # None on the ranks other than 0 of a data-parallel run
    curves: list = field(default_factory=list)  # one row per evaluation point
    layers: list = field(default_factory=list)  # per evaluation point and weighted layer
    signals: list = field(default_factory=list)  # per evaluation point and block
    windows: list = field(default_factory=list)  # the timed stretches between evaluation points
    wall_before: float = 0.0  # wall time of earlier attempts
    attempt: int = 0  # this attempt's number (timing uses this attempt's windows only)
    train_time: float = 0.0
    result: dict | claims.Skip | None = None
    writer: object = None  # its TensorBoard SummaryWriter (--tensorboard), opened at its first point

    @classmethod
    def resume(cls, spec: RunSpec, claim, ck: dict | None) -> "Member":
        if ck is None:
            return cls(spec, claim)
        windows = ck["windows"]
        return cls(spec, claim, ck["curves"], ck.get("layers", []), ck.get("signals", []),  # earlier versions: none
                   windows, ck["wall_s"], 1 + max((w.get("attempt", 0) for w in windows), default=-1),
                   ck["curves"][-1]["train_time_s"] if ck["curves"] else 0.0)

    def curve(self, point: dict, loss: float, err: float, val: float, test: float) -> None:
        self.curves.append(dict(point, run_id=self.spec.run_id, train_loss=loss, train_err=err, val_err=val,
                                test_err=test, train_time_s=self.train_time))

    def scalars(self, out: Path, start: int) -> None:
        """The last evaluation point's scalars for TensorBoard, into <out>/tb/<run_id> (a resumed run first drops
        the events its last attempt wrote after its checkpoint: ``purge_step``)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package (--tensorboard checks)

            self.writer = SummaryWriter(str(Path(out) / "tb" / self.spec.run_id), purge_step=start or None)
        p = self.curves[-1]
        for tag in TB_SCALARS:
            if p.get(tag) is not None and p[tag] == p[tag]:  # NaN: no validation set, say
                self.writer.add_scalar(tag, p[tag], p["iteration"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


TB_SCALARS = ("train_loss", "train_err", "val_err", "test_err", "lr", "img_per_s", "data_wait_s")  # --tensorboard
INPUT_BOUND = 0.5  # a window whose steps waited this much of it for their batches: the input pipeline bounds the run


def _lockstep(specs: list[RunSpec], held: list[claims.Claim], cks: list[dict | None], d: sources.Source, out: Path,
              ex: Execution, *, progress: bool) -> list[dict | claims.Skip]:
    """Train ``specs`` (all starting at one iteration) as one group; write and return each one's row."""
    return _Group(specs, held, cks, d, out, ex).train(progress)


class _Group:
    """A group's training (a lone run is a group of one): its members, the grouped network, optimizer and step."""

    def __init__(self, specs: list[RunSpec], held: list[claims.Claim], cks: list[dict | None], d: sources.Source, out: Path,
                 ex: Execution):
        self.d, self.out, self.ex = d, out, ex
        self.device = device = torch.device(ex.device)
        self.gid = fuse.group_id(specs)  # the runs that really trained together
        self.memory_tracked = reset_peak_memory(device)
        self.place = ddp.place()  # a data-parallel run: this process trains its share of each batch; rank 0 records
        self.loaders = d.loaders(specs, ex, device, self.place)
        self.r = specs[0].recipe.in_steps(self.loaders[0].steps_per_epoch)  # an epoch-based schedule, for the data
        nets = []
        for s, ck in zip(specs, cks):
            torch.manual_seed(s.seed)  # each member's initial weights are the ones it gets alone
            net = resnet.build(s.model, d.num_classes, width=s.width, shortcut=s.shortcut, in_channels=d.in_channels,
                               stem=data.stem(s.dataset, s.model))
            if ck is not None:
                net.load_state_dict(ck["model"])
            nets.append(net)
        self.params = resnet.count_params(nets[0])
        self.macs = resnet.count_macs(nets[0], (d.in_channels, *d.image_shape[1:]))
        self.derived = json.dumps(getattr(nets[0], "derived", {}), sort_keys=True)  # a method's own (TAT's slope)
        self.members = Members(nets, pad_input=ex.pad_input or None)
        fmt = torch.channels_last if ex.channels_last else torch.contiguous_format
        self.model = self.members.model.to(device, memory_format=fmt)
        r = self.r
        self.opt = make_optimizer(self.model, r.lr, r.momentum, r.weight_decay, device,
                                  lr_scales=resnet.lr_scales(specs[0].model), decay_1d=r.decay_1d)
        self.start = cks[0]["iteration"] if cks[0] is not None else 0
        self.runs = [Member.resume(s, h, ck) for s, h, ck in zip(specs, held, cks)]
        if self.start:
            self.members.load_optimizer_states(self.opt, [ck["optimizer"] for ck in cks])
            if len(specs) == 1:  # group members saved one process's state: nothing of it is theirs to restore
                torch.set_rng_state(cks[0]["rng"]["torch"].cpu())  # map_location moved it; the CPU RNG wants it back
                if device.type == "cuda" and "cuda" in cks[0]["rng"]:
                    torch.cuda.set_rng_state(cks[0]["rng"]["cuda"].cpu(), device)
        self.step = TrainStep(_data_parallel(self.model, ex, device), self.opt, execution=ex.execution, amp=ex.amp,
                              device=device, members=len(specs))
        self.active = list(range(len(specs)))
        self.t_wall = self.t_beat = time.perf_counter()

    def train(self, progress: bool) -> list[dict | claims.Skip]:
        r, depth, first = self.r, self.runs[0].spec.arch.depth, self.runs[0].spec
        desc = f"{first.model} seed {first.seed}" if len(self.runs) == 1 else f"{len(self.runs)} x {depth} layers"
        self.bar = Progress(r.iterations, self.start, desc, progress and self.place.main)
        sync(self.device)
        self.t0, self.data_wait, self.input_bound = time.perf_counter(), 0.0, False
        self.model.train()
        lr, recent, it = None, collections.deque(maxlen=SIGNAL_BATCHES), self.start
        try:
            for it in range(self.start, r.iterations):
                if r.lr_at(it, depth) != lr:
                    lr = r.lr_at(it, depth)
                    set_lr(self.opt, lr)
                t = time.perf_counter()
                batch = self.d.batch(self.loaders, it)
                self.data_wait += time.perf_counter() - t  # the step waited for its batch (decoding, augmentation)
                self.step(*batch)
                recent.append(batch)  # the backward signals are measured on the last batches trained (each rank's)
                self.bar.step()
                if ((it + 1) % r.eval_every and it + 1 != r.iterations) or self._evaluation_point(it + 1, recent):
                    continue
                break  # no member left
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM turned into it by the CLI: say where training stood
            raise Interrupted(desc, it, r.iterations) from e
        finally:  # also when interrupted: the bar leaves the terminal, an ImageNet-style loader's decoding
            self.bar.close()  # processes stop (left to the garbage collector, they took seconds each)
            for loader in self.loaders:
                loader.close()
            for m in self.runs:
                m.close()
        for k in list(self.active):
            self.runs[k].result = self._finish(k, "ok", None)
        return [m.result for m in self.runs]

    def _evaluation_point(self, iteration: int, recent) -> bool:
        """Read, measure, evaluate, beat and checkpoint after ``iteration`` steps: the only host syncs of the
        loop. False when no member is left to train."""
        sync(self.device)
        window = time.perf_counter() - self.t0
        losses, errs, seen = self.step.read_members()
        point = dict(iteration=iteration, epoch=iteration / self.loaders[0].steps_per_epoch, lr=current_lr(self.opt),
                     img_per_s=seen / window, data_wait_s=self.data_wait)
        for k in self.active:
            m = self.runs[k]
            m.train_time += window
            m.windows.append(dict(attempt=m.attempt, steps=seen // self.r.batch_size, seconds=window,
                                  img_per_s=seen / window, group_size=len(self.active)))
        for k in [k for k in self.active if not math.isfinite(losses[k])]:
            self.runs[k].curve(point, losses[k], errs[k], float("nan"), float("nan"))
            self._drop(k, self._finish(k, "diverged", f"non-finite training loss at iteration {iteration}"))
        if not self.active:
            return False
        self._measure(iteration, list(recent))
        ddp.sync_buffers(self.model)
        val_err = self.d.evaluate(self.model, "val", self.ex, self.device, self.members)
        test_err = self.d.evaluate(self.model, "test", self.ex, self.device, self.members)
        for k in self.active:
            self.runs[k].curve(point, losses[k], errs[k], val_err[k], test_err[k])
        k0 = self.active[0]
        waited = self.data_wait / window
        self.bar.show(loss=f"{losses[k0]:.3f}", train_err=f"{100 * errs[k0]:.1f} %",
                      val_err=f"{100 * val_err[k0]:.1f} %", img_s=f"{seen * len(self.active) / window:.0f}",
                      data_wait=f"{100 * waited:.0f} %")
        if waited > INPUT_BOUND and not self.input_bound and self.place.main and self.d.loader == "stream-loader":
            self.input_bound = True  # said once a run
            say(f"warning: {self.bar.desc} waited for its input {100 * waited:.0f} % of the last window: input-bound "
                f"(more --loader-workers, or --decode-on device; `resbench profile --decode TREE` times the decoding)",
                err=True)
        lost = {}
        for k in list(self.active) if self.place.main else []:
            try:
                self.runs[k].claim.beat(time.perf_counter() - self.t_beat)
            except claims.Claimed as e:  # another trainer took this run over: stop it without writing
                lost[k] = str(e)
        for k, why in ddp.from_main(lost).items():
            self._drop(k, claims.Claimed(why))
        if not self.active:
            return False
        self.t_beat = time.perf_counter()
        if self.place.main:  # the runs still ours (their claims beat): their points so far, for whoever watches
            self._publish()
        if iteration < self.r.iterations and self.place.main:
            self._checkpoint(iteration)
        sync(self.device)
        self.t0, self.data_wait = time.perf_counter(), 0.0
        return True

    def _publish(self) -> None:
        """The evaluation point as it happens, for whoever watches the sweep: each member's curve so far
        (curves/<run_id>.parquet, rewritten whole and atomically, so a crash keeps the points so far and a report
        of a running sweep draws it) and, with --tensorboard, its scalars (<out>/tb/<run_id>)."""
        for k in self.active:
            m = self.runs[k]
            records.write_table(pd.DataFrame(m.curves, columns=records.CURVE_COLUMNS), "curves",
                                records.paths(self.out, m.spec.run_id)["curves"])
            if self.ex.tensorboard:
                m.scalars(self.out, self.start)

    def _measure(self, iteration: int, recent: list) -> None:
        """The gradients of the last step (the same on every rank of a data-parallel run: rank 0 records them) and
        the backward signal on the batches the last steps trained on: on every rank, whose BN may be synchronised
        (a train-mode forward is then a collective); rank 0 records its own share's."""
        ids = {k: self.runs[k].spec.run_id for k in self.active} if self.place.main else {}
        for k, rows in probes.layer_rows(self.members, self.opt, ids, iteration).items():
            self.runs[k].layers += rows
        for k, rows in probes.signal_rows(self.members, recent, self.ex.amp, ids, iteration).items():
            self.runs[k].signals += rows

    def _checkpoint(self, iteration: int) -> None:
        for k in self.active:
            m = self.runs[k]
            checkpoints.save_torch(dict(spec=m.spec.to_json(), model=self.members.state(k),
                                    optimizer=self.members.optimizer_state(self.opt, k), rng=_rng_state(self.device),
                                    iteration=iteration, curves=m.curves, layers=m.layers, signals=m.signals,
                                    windows=m.windows, wall_s=m.wall_before + time.perf_counter() - self.t_wall),
                               records.paths(self.out, m.spec.run_id)["ckpt"])

    def _drop(self, k: int, result) -> None:
        """Member k leaves: its slot is zeroed and masked out of the loss, the others go on unchanged."""
        self.runs[k].result = result
        self.active.remove(k)
        if len(self.runs) > 1:
            self.members.clear(self.opt, k)
            self.step.mask(k)

    def _finish(self, k: int, status: str, error: str | None) -> dict | claims.Skip:
        """Write member k's records (weights and curves first, the run row last: a row means complete).
        Only rank 0 of a data-parallel run writes; the others learn from it whether the run is still theirs."""
        m, lost = self.runs[k], None
        if self.place.main:
            try:
                m.claim.beat(time.perf_counter() - self.t_beat)  # still ours: nobody else writes this run's records
            except claims.Claimed as e:
                lost = str(e)
        lost = ddp.from_main(lost)
        if lost is not None:
            return claims.Claimed(lost)
        final = self.d.final(self.model, self.ex, self.device, m.spec.recipe) if status == "ok" else {}  # collectives
        row = _row(m.spec, m.curves, timed_windows(m.windows, m.attempt), params=self.params, macs=self.macs,
                   status=status, error=error, start=self.start, train_time=m.train_time,
                   wall=m.wall_before + time.perf_counter() - self.t_wall, ex=self.ex, source=self.d, group_id=self.gid,
                   group_size=len(self.runs), peak=peak_memory(self.device) if self.memory_tracked else None) \
            | dict(method_derived=self.derived) | final
        if self.place.main:
            p = records.paths(self.out, m.spec.run_id)
            checkpoints.save_torch(dict(spec=m.spec.to_json(), model=self.members.state(k), num_classes=self.d.num_classes,
                                    in_channels=self.d.in_channels), p["weights"])
            records.write_table(pd.DataFrame(m.curves, columns=records.CURVE_COLUMNS), "curves", p["curves"])
            records.write_table(pd.DataFrame(m.layers, columns=records.LAYER_COLUMNS), "layers", p["layers"])
            records.write_table(pd.DataFrame(m.signals, columns=records.SIGNAL_COLUMNS), "signals", p["signals"])
            records.write_table(pd.DataFrame([row]), "runs", p["run"])
            p["ckpt"].unlink(missing_ok=True)
        return row


def _data_parallel(model: torch.nn.Module, ex: Execution, device: torch.device) -> torch.nn.Module:
    """The model the step runs: ``model`` itself, or in a data-parallel run ``model`` wrapped by DDP (which
    averages the gradients over the ranks); with ``sync_bn`` its BatchNorm first made synchronous. The
    wrapper shares ``model``'s parameters: records, checkpoints and weights read ``model``, unchanged."""
    if not ddp.active():
        return model
    from torch.nn.parallel import DistributedDataParallel

    if ex.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def _row(spec: RunSpec, curves: list[dict], timed: list[dict], *, params: int, macs: int, status: str,
         error: str | None, start: int, train_time: float, wall: float, ex: Execution, source,
         group_id: str, group_size: int, peak: int | None) -> dict:
    """A run's row: its spec, its summary, how fast, and where (records.environment)."""
    cdf = pd.DataFrame(curves, columns=records.CURVE_COLUMNS)
    # val_err is NaN throughout with --val-size 0, test_err only at a divergence point
    validated, tested = cdf[cdf["val_err"].notna()], cdf[cdf["test_err"].notna()]
    nan = float("nan")
    return spec.flat() | dict(
        params=params, macs=macs, status=status, error=error,
        iterations_done=int(cdf["iteration"].max()) if len(cdf) else 0,
        resumed_from=start,  # the iteration this (last) attempt continued from; 0 for an uninterrupted run
        final_train_loss=cdf["train_loss"].iloc[-1] if len(cdf) else nan,
        final_train_err=cdf["train_err"].iloc[-1] if len(cdf) else nan,
        final_val_err=validated["val_err"].iloc[-1] if len(validated) else nan,
        late_val_err=outcome.late(cdf, "val_err"),  # what a tuned sweep chooses its lr on (bench.tuning)
        final_test_err=tested["test_err"].iloc[-1] if len(tested) else nan,
        best_train_err=cdf["train_err"].min() if len(cdf) else nan,
        best_val_err=validated["val_err"].min() if len(validated) else nan,
        # test error at the best validation point: model selection never looks at the test set
        test_err_at_best_val=validated.loc[validated["val_err"].idxmin(), "test_err"] if len(validated) else nan,
        best_test_err=tested["test_err"].min() if len(tested) else nan,
        # this run's own images per second; group_img_per_s counts every member trained meanwhile
        train_img_per_s=statistics.median(w["img_per_s"] for w in timed) if timed else nan,
        group_img_per_s=statistics.median(w["img_per_s"] * w.get("group_size", 1) for w in timed) if timed else nan,
        step_time_ms=1e3 * statistics.median(w["seconds"] / max(w["steps"], 1) for w in timed) if timed else nan,
        timed_windows=len(timed),
        train_time_s=train_time, wall_time_s=wall,
        peak_memory_bytes=peak,  # the process's: a group's members share it
        amp=ex.amp, channels_last=ex.channels_last, execution=ex.execution, cudnn_benchmark=ex.cudnn_benchmark,
        pad_input=ex.pad_input if group_size > 1 else 0,  # a lone net is never padded
        world_size=ex.world_size, per_process_batch=spec.recipe.batch_size // ex.world_size,
        bn_mode="whole batch" if ex.world_size == 1 else ("synchronised" if ex.sync_bn else "per process"),
        train_path=f"{source.loader}+{ex.execution}", group_size=group_size, group_id=group_id,
        decode_on=source.decode_on,  # ImageNet-style data: where its JPEGs were decoded
        data_source=source.source, data_sha256=source.sha256, data_official=source.official,
    ) | env.environment(ex.device)


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
        ck = checkpoints.load_torch(path, map_location=device)
        if not isinstance(ck, dict) or not CHECKPOINT_KEYS <= ck.keys():
            raise checkpoints.UnreadableFile(f"{path} is not a resbench checkpoint (keys missing)")
    except checkpoints.UnreadableFile as e:
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


def run_recorded(specs: list[RunSpec], out: Path, ex: Execution, **kw) -> list[dict | claims.Skip] | None:
    """``run_group`` as every executor runs it: a group (or one data-parallel run) whose training raises is
    recorded, never lost. Each process that raised writes its traceback to errors/<run_id>.rank<r>.err (a
    data-parallel run's other ranks see only a peer that went away); rank 0 then records each member left
    without a record as failed, with the error of the rank that failed first. Returns the members' rows
    (or Skips); None on a rank other than 0 whose run raised."""
    try:
        return run_group(specs, out, ex, **kw)
    except Exception as e:
        failure = _rank_failure(specs, out, e)
        if not ddp.place().main:
            return None
        return [record_unfinished(spec, out, ex, failure) for spec in specs]


def _rank_failure(specs: list[RunSpec], out: Path, exc: BaseException) -> BaseException:
    """Write this process's traceback for each of ``specs``; on rank 0, the exception to record: its own, or,
    in a data-parallel run, the one of the rank whose error file came first (a broken peer's, not the
    'connection closed' it left behind; rank 0's own where it failed first), naming the rank."""
    place = ddp.place()
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    folder = records.paths(out, specs[0].run_id)["errors"]
    folder.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        records.atomic_write(folder / f"{spec.run_id}.rank{place.rank}.err", lambda tmp: tmp.write_text(text))
    if place.world == 1 or not place.main:
        return exc
    # a peer that raised wrote its file before its process ended, which is what ended ours
    first = first_rank_error(out, specs[0].run_id, place.world)
    return exc if first is None else RuntimeError(first)  # which rank, its error, where each traceback is


def first_rank_error(out: Path, run_id: str, world: int) -> str | None:
    """The error of the process of a data-parallel run whose traceback file (errors/<run_id>.rank<r>.err) came
    first, as 'rank R of W failed first: <its exception>', or None where no process left one."""
    folder = records.paths(out, run_id)["errors"]
    files = sorted(folder.glob(f"{run_id}.rank*.err"), key=lambda f: f.stat().st_mtime_ns) if folder.is_dir() else []
    if not files:
        return None
    rank = files[0].name.rsplit(".rank", 1)[1].removesuffix(".err")
    last = [ln for ln in files[0].read_text().splitlines() if ln.strip()][-1].strip()
    return f"rank {rank} of {world} failed first: {last} (each process's traceback: {folder}/{run_id}.rank*.err)"


def record_unfinished(spec: RunSpec, out: Path, ex: Execution, exc: BaseException) -> dict:
    """The row of a group member after its group raised: its own record if it had finished (diverged
    members are written as they diverge), else a failed row (record_failure). The executors' one rule."""
    row = records.recorded(out, spec.run_id)
    return row if row is not None and row["status"] in records.DONE else record_failure(spec, out, ex, exc)


def record_failure(spec: RunSpec, out: Path, ex: Execution, exc: BaseException) -> dict:
    """Write (and return) the row of a run that raised: its spec, the error text and the environment."""
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    row = spec.flat() | dict(status="failed", error=text) | env.environment(ex.device)
    records.write_table(pd.DataFrame([row]), "runs", records.paths(Path(out), spec.run_id)["run"])
    return row
