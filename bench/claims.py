"""Claims: one trainer per run, across the processes, sweeps and machines that share a results folder.

Before a run trains, its trainer claims it: ``claims/<run_id>.json``, holding the holder's host, pid,
Slurm job id, a random token, the time it started, a heartbeat and ``stale_after_s``. Claims are
taken and given up under an exclusive lock on ``claims/.lock`` (flock), so two sweeps started at
the same moment cannot both take a run. The holder refreshes the heartbeat at every evaluation
point. Another trainer skips a claimed run unless the claim is stale:

- its holder ran on this host and its process is gone (killed, crashed): stale at once;
- it belongs to this very Slurm task (a requeued task takes over its own run);
- its heartbeat is older than ``stale_after_s``: 30 minutes until the first evaluation point (data
  loading, cuDNN autotuning, compilation and graph capture come first), then 5 times the holder's
  longest interval between heartbeats so far, and never less than 5 minutes.

A holder whose claim was taken over (it stalled past that rule) learns so at its next heartbeat and
stops without writing records, so a run never has two writers.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path

from bench import records

STALE_FIRST_S = 1800.0  # until the first heartbeat
STALE_MIN_S = 300.0
STALE_INTERVALS = 5


class Skip(Exception):
    """This trainer must not train the run (another one holds it, or has finished it)."""


class Claimed(Skip):
    """Another live trainer holds the run."""


def folder(out: Path) -> Path:
    return Path(out) / "claims"


def path(out: Path, run_id: str) -> Path:
    return folder(out) / f"{run_id}.json"


def slurm_task() -> str | None:
    """This process's Slurm task: 'JOB_TASK' in an array, 'JOB' otherwise, None outside Slurm."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def read(out: Path, run_id: str) -> dict | None:
    """The claim on ``run_id``, or None (also for an unreadable claim file, which then counts as stale)."""
    try:
        return json.loads(path(out, run_id).read_text())
    except (OSError, ValueError):
        return None


def is_stale(claim: dict | None, now: float | None = None) -> bool:
    """Whether another trainer may take this claim over (see the module docstring for the rule)."""
    if claim is None or not {"host", "pid", "heartbeat", "stale_after_s"} <= claim.keys():
        return True
    if claim["host"] == socket.gethostname() and not _alive(int(claim["pid"])):
        return True
    if claim.get("slurm_task") and claim["slurm_task"] == slurm_task():
        return True
    return (now or time.time()) - float(claim["heartbeat"]) > float(claim["stale_after_s"])


def describe(claim: dict) -> str:
    job = f", Slurm task {claim['slurm_task']}" if claim.get("slurm_task") else ""
    age = time.time() - float(claim.get("heartbeat", 0))
    return f"{claim.get('host')} pid {claim.get('pid')}{job}, heartbeat {age:.0f} s ago"


@contextlib.contextmanager
def _locked(out: Path):
    folder(out).mkdir(parents=True, exist_ok=True)
    with open(folder(out) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Claim:
    """This process's claim on one run: ``acquire()``, ``beat(seconds)`` at each evaluation point, ``release()``."""

    def __init__(self, out: Path, run_id: str):
        self.out, self.run_id = Path(out), run_id
        self.token = uuid.uuid4().hex
        self.longest_s = 0.0
        self.state: dict = {}

    def _write(self) -> None:
        records.atomic_write(path(self.out, self.run_id), lambda tmp: tmp.write_text(json.dumps(self.state)))

    def acquire(self) -> None:
        """Take the run, or raise Claimed (naming the holder) if a live trainer has it."""
        with _locked(self.out):
            held = read(self.out, self.run_id)
            if path(self.out, self.run_id).exists() and not is_stale(held):
                raise Claimed(f"{self.run_id} is being trained by {describe(held)}")
            now = time.time()
            self.state = dict(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(),
                              slurm_task=slurm_task(), token=self.token, started=now, heartbeat=now,
                              stale_after_s=STALE_FIRST_S)
            self._write()

    def _mine(self) -> bool:
        held = read(self.out, self.run_id)
        return held is not None and held.get("token") == self.token

    def beat(self, interval_s: float) -> None:
        """Refresh the heartbeat; ``interval_s`` is the time since the last one. Raises Claimed if the
        claim was taken over meanwhile (this trainer must then stop without writing)."""
        self.longest_s = max(self.longest_s, interval_s)
        with _locked(self.out):
            if not self._mine():
                held = read(self.out, self.run_id)
                raise Claimed(f"{self.run_id} was taken over by {describe(held) if held else 'another trainer'} "
                              f"(this trainer's heartbeat had gone stale); stopping without writing")
            self.state.update(heartbeat=time.time(), stale_after_s=max(STALE_MIN_S, STALE_INTERVALS * self.longest_s))
            self._write()

    def release(self) -> None:
        with _locked(self.out):
            if self._mine():
                path(self.out, self.run_id).unlink(missing_ok=True)


def held(out: Path) -> dict[str, dict]:
    """run_id -> claim of every claim file in ``out`` (stale ones included; see is_stale)."""
    found = {}
    for f in sorted(folder(out).glob("*.json")) if folder(out).is_dir() else []:
        claim = read(out, f.stem)
        if claim is not None:
            found[f.stem] = claim
    return found
