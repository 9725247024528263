"""Data-parallel runs: one run over several processes (torch.distributed): one per GPU (NCCL), or several
on the CPU (gloo, for tests and for nodes without GPUs).

Every process trains the same net on its share of each global batch (the recipe's batch: a process
sees batch / world images), DDP averages the gradients, so the update is the single-process one
except where BatchNorm's statistics come from fewer images (``bn_batch`` in the run's spec: its
identity, since it changes the result; ``--sync-bn`` on CUDA keeps the whole batch's). Only rank 0
claims the run, writes records and checkpoints; every rank reads the checkpoint it resumes from.
Evaluation splits the images between the ranks and sums the wrong answers: each image is counted
exactly once. A rank that dies ends the run: its peers' collectives time out (``TIMEOUT_S``), and
the launcher ends the others as soon as one fails.

Where a process learns its place: the environment torchrun and submitit's
TorchDistributedEnvironment set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_S = float(os.environ.get("RESBENCH_DDP_TIMEOUT", "300"))  # a collective waits this long for a dead peer


@dataclass(frozen=True)
class Place:
    """This process's place in a data-parallel run (0 of 1 alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def place() -> Place:
    env = os.environ
    return Place(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def init(cuda: bool) -> Place:
    """Join the run's process group (once), NCCL on CUDA, gloo on the CPU; alone, nothing to join."""
    p = place()
    if p.world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(p.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=dt.timedelta(seconds=TIMEOUT_S))
    return p


def leave() -> None:
    """Wait for every rank, then close the process group: a process that exits while gloo's threads still
    talk to a peer aborts ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks, in place (alone: ``t``)."""
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def from_main(value):
    """Rank 0's ``value`` on every rank (a picklable object)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(module: torch.nn.Module) -> None:
    """Every rank gets rank 0's buffers (BN's running statistics): each rank's BN updated them from its own
    share of the last batch, and an evaluation split over the ranks must use one net, rank 0's (the one
    its records and weights describe)."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, src=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int, env: dict, *, cuda: bool) -> list[subprocess.Popen]:
    """Start ``world`` processes of ``python -m bench <args>`` as torchrun would on one machine: ranks
    0..world-1, rank r on GPU r (CUDA) or on a share of the cores (CPU)."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world)
    procs = []
    for r in range(world):
        e = os.environ | env | dict(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                                    MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        if not cuda:
            e["OMP_NUM_THREADS"] = str(threads)
        procs.append(subprocess.Popen([sys.executable, "-m", "bench", *args], env=e))
    return procs


GRACE_S = float(os.environ.get("RESBENCH_DDP_GRACE", "20"))  # how long the others may take to stop on their own


def wait(procs: list[subprocess.Popen], poll_s: float = 0.2, grace_s: float | None = None) -> list[int | None]:
    """Wait for a run's processes. Returns each rank's exit code as it ended on its own: all 0 when all
    succeed; once one fails, the codes seen at that moment, None for the ranks still running. Those get
    ``grace_s`` to end on their own (rank 0 sees its peer go away and writes the run's record, naming the
    rank that failed first), then they are ended (a rank can sit in a collective until its timeout)."""
    grace_s = GRACE_S if grace_s is None else grace_s
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            deadline = time.monotonic() + grace_s
            while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
                time.sleep(poll_s)
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
            return codes
        if all(c == 0 for c in codes):
            return codes
        time.sleep(poll_s)


def first_failure(codes: list[int | None]) -> tuple[int, int] | None:
    """(rank, exit code) of the rank that ended the run, from ``wait``'s codes; None if all succeeded. A rank
    ended by a signal (killed from outside: kill -9, the OOM killer) comes first even where a peer's exit
    was seen at the same poll: its peers only see a connection it closed and raise over it."""
    failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
    return min(failed, key=lambda rc: rc[1] >= 0) if failed else None


def signal_name(code: int) -> str:
    """'SIGKILL' for a Popen exit code of -9; '' for a code that is no signal."""
    try:
        return signal.Signals(-code).name if code < 0 else ""
    except ValueError:
        return f"signal {-code}"
