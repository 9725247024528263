"""Claims: one trainer per run, across the processes, sweeps and machines that share a results folder.

Before a run trains, its trainer claims it; the holder refreshes a heartbeat at every evaluation
point, and another trainer skips a claimed run unless the claim is stale:

- its holder ran on this host and its process is gone (killed, crashed): stale at once;
- it belongs to this very Slurm task (a requeued task takes over its own run);
- its heartbeat is older than ``stale_after_s``: 30 minutes until the first evaluation point (data
  loading, cuDNN autotuning, compilation and graph capture come first), then 5 times the holder's
  longest interval between heartbeats so far, and never less than 5 minutes.

A holder whose claim was taken over (it stalled past that rule) learns so at its next heartbeat and
stops without writing records, so a run never has two writers.

How, without locks. A results folder shared by a cluster's nodes lives on NFS, Lustre, GPFS or
BeeGFS, where ``flock`` is refused (Lustre without ``-o flock``: ENOSYS; NFSv3 without its lock
daemon: ENOLCK) or holds on one node only (Lustre's ``localflock``, BeeGFS by default). What those
filesystems keep coherent across nodes is their metadata: creating a name that must not exist
(a hard link of a fully written unique file, the NFS-safe exclusive creation the open(2) manual
describes), rename, and the timestamps they set. Claims use only these:

    claims/<run_id>.json              the claim: who holds the run (host, pid, Slurm task, token).
                                      Created by link(2), so it exists only complete and only once;
                                      never rewritten by its holder.
    claims/<run_id>.<token>.beat      the holder's heartbeat: its mtime, and stale_after_s. Only the
                                      holder of ``token`` writes it (temp file + rename).
    claims/<run_id>.<token>.takeover  created by link(2) by whoever takes over the claim ``token``:
                                      of all the trainers that find one stale claim at the same
                                      moment, exactly one creates it; the others skip the run.

A takeover then renames its own claim over the stale one. Two orders of operations keep a run to
one writer even when a stalled holder wakes during a takeover: the holder writes its heartbeat
*before* it checks that the claim is still its own (and writes records only after that check), and
the taker checks the heartbeat *after* it replaced the claim; if the heartbeat moved meanwhile, the
holder is alive: the taker puts the holder's claim back and skips the run. (A holder that checked
after the replacement found the claim not its own and stopped, deleting its heartbeat: the taker
then sees none and trains. Either way one trainer goes on.) Files are read through open(2), so NFS
clients revalidate them (close-to-open consistency) instead of serving cached attributes.

Clocks: ages are differences of timestamps the filesystem set (a heartbeat file's mtime against
the mtime of a probe this process has just written into claims/), never a node's own clock, so a
node whose clock is off neither takes over live claims nor keeps dead ones. On NFS both stamps come
from the server's clock. Where a filesystem takes timestamps from the writing client's clock, the
two nodes' clocks enter the difference: skews well under STALE_MIN_S (5 minutes) are tolerated;
NTP keeps cluster nodes within far less.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

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


def _beat_path(out: Path, run_id: str, token: str) -> Path:
    return folder(out) / f"{run_id}.{token}.beat"


def _takeover_path(out: Path, run_id: str, token: str) -> Path:
    return folder(out) / f"{run_id}.{token}.takeover"


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


def _unique(out: Path, text: str) -> Path:
    """A fully written file under a name no other process uses (the source of a link or rename)."""
    tmp = folder(out) / f".{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _create(out: Path, target: Path, text: str) -> bool:
    """Create ``target`` holding ``text`` if no file of that name exists; True if this call made it.

    link(2) of a unique, complete file: atomic and exclusive on local filesystems, NFS, Lustre, GPFS
    and BeeGFS. Where an NFS reply is lost and the retried link reports EEXIST although it worked,
    the unique file's link count (2) tells (the open(2) manual's recipe).
    """
    folder(out).mkdir(parents=True, exist_ok=True)
    tmp = _unique(out, text)
    try:
        try:
            os.link(tmp, target)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def _stamp(p: Path) -> tuple[float, int] | None:
    """(mtime in seconds, inode) of ``p`` read through open(2) (NFS revalidates on open), or None if absent."""
    try:
        fd = os.open(p, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        return st.st_mtime_ns / 1e9, st.st_ino
    finally:
        os.close(fd)


def fs_now(out: Path) -> float:
    """The filesystem's time now: the mtime of a probe just written into claims/ (see the module docstring)."""
    folder(out).mkdir(parents=True, exist_ok=True)
    probe = _unique(out, "")
    try:
        return _stamp(probe)[0]
    finally:
        probe.unlink(missing_ok=True)


def _read_json(p: Path) -> dict | None:
    try:
        with open(p) as f:
            value = json.loads(f.read())
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


def read(out: Path, run_id: str) -> dict | None:
    """The claim on ``run_id`` with its heartbeat: the holder's fields, plus ``heartbeat`` (the filesystem
    time of the last heartbeat, or of the claim's creation before the first one) and ``stale_after_s``.
    None if there is no claim; an unreadable claim file reads as a claim without fields (stale)."""
    p = path(out, run_id)
    made = _stamp(p)
    if made is None:
        return None
    claim = _read_json(p) or {}
    beat = _stamp(_beat_path(out, run_id, claim["token"])) if claim.get("token") else None
    beat_info = _read_json(_beat_path(out, run_id, claim["token"])) if beat else None
    claim["heartbeat"] = beat[0] if beat else made[0]
    claim["beat_id"] = beat[1] if beat else None  # which heartbeat file: a new one is a new inode
    claim["stale_after_s"] = float((beat_info or {}).get("stale_after_s", STALE_FIRST_S))
    claim["claim_id"] = made[1]
    return claim


def is_stale(claim: dict | None, now: float | None = None) -> bool:
    """Whether another trainer may take this claim over (see the module docstring for the rule). ``now``:
    the filesystem's time (fs_now); ages measured with a node's own clock would follow its errors."""
    if claim is None or not {"host", "pid", "token"} <= claim.keys():
        return True
    if claim["host"] == socket.gethostname() and not _alive(int(claim["pid"])):
        return True
    if claim.get("slurm_task") and claim["slurm_task"] == slurm_task():
        return True
    if now is None:
        raise ValueError("is_stale needs the filesystem's time (claims.fs_now) to judge a heartbeat's age")
    return now - float(claim["heartbeat"]) > float(claim["stale_after_s"])


def describe(claim: dict, now: float | None = None) -> str:
    job = f", Slurm task {claim['slurm_task']}" if claim.get("slurm_task") else ""
    age = f", heartbeat {now - float(claim['heartbeat']):.0f} s ago" if now is not None and "heartbeat" in claim else ""
    return f"{claim.get('host')} pid {claim.get('pid')}{job}{age}"


class Claim:
    """This process's claim on one run: ``acquire()``, ``beat(seconds)`` at each evaluation point, ``release()``."""

    def __init__(self, out: Path, run_id: str):
        self.out, self.run_id = Path(out), run_id
        self.token = uuid.uuid4().hex
        self.longest_s = 0.0
        self.state: dict = {}

    def _fields(self) -> str:
        self.state = dict(run_id=self.run_id, host=socket.gethostname(), pid=os.getpid(), slurm_task=slurm_task(),
                          token=self.token, started=time.time())  # started: for people; ages use fs times
        return json.dumps(self.state)

    def acquire(self) -> None:
        """Take the run, or raise Claimed (naming the holder) if a live trainer has it, or another
        trainer is taking over the same stale claim at this moment."""
        target = path(self.out, self.run_id)
        for _ in range(3):  # the claim may vanish (released) between our attempts
            if _create(self.out, target, self._fields()):
                return
            held = read(self.out, self.run_id)
            if held is None:
                continue  # released meanwhile: try to create it again
            now = fs_now(self.out)
            if not is_stale(held, now):
                raise Claimed(f"{self.run_id} is being trained by {describe(held, now)}")
            self._take_over(held)
            return
        raise Claimed(f"{self.run_id} is being claimed and released by other trainers; leaving it to them")

    def _take_over(self, stale: dict) -> None:
        old = stale.get("token") or f"unreadable-{stale['claim_id']}"
        if not _create(self.out, _takeover_path(self.out, self.run_id, old), self.token):
            raise Claimed(f"{self.run_id}: another trainer is taking over its stale claim ({describe(stale)})")
        try:  # only the winner of the marker above replaces this claim, so it is still the stale one
            with open(path(self.out, self.run_id)) as f:
                original = f.read()
        except OSError:
            original = None  # its holder released it meanwhile
        os.replace(_unique(self.out, self._fields()), path(self.out, self.run_id))
        # the stale holder may have woken meanwhile: it beats before it checks its claim, so a heartbeat
        # that moved since we judged it means it is alive and may have passed its check: give it back
        after = read_beat(self.out, self.run_id, old)
        if stale.get("token") and after[0] is not None and after != (stale["heartbeat"], stale["beat_id"]):
            if original is not None and self._mine():
                os.replace(_unique(self.out, original), path(self.out, self.run_id))
            raise Claimed(f"{self.run_id}: its holder ({describe(stale)}) woke while we took it over; "
                          f"left to it")
        _beat_path(self.out, self.run_id, old).unlink(missing_ok=True)

    def _mine(self) -> bool:
        held = _read_json(path(self.out, self.run_id))
        return held is not None and held.get("token") == self.token

    def beat(self, interval_s: float) -> None:
        """Refresh the heartbeat; ``interval_s`` is the time since the last one. Raises Claimed if the
        claim was taken over meanwhile (this trainer must then stop without writing)."""
        self.longest_s = max(self.longest_s, interval_s)
        stale_after = max(STALE_MIN_S, STALE_INTERVALS * self.longest_s)
        tmp = _unique(self.out, json.dumps(dict(stale_after_s=stale_after)))
        os.replace(tmp, _beat_path(self.out, self.run_id, self.token))  # first the heartbeat, then the check
        if not self._mine():
            _beat_path(self.out, self.run_id, self.token).unlink(missing_ok=True)
            held = read(self.out, self.run_id)
            raise Claimed(f"{self.run_id} was taken over by {describe(held) if held else 'another trainer'} "
                          f"(this trainer's heartbeat had gone stale); stopping without writing")
        self.state["stale_after_s"] = stale_after

    def release(self) -> None:
        """Give the run up (done, or leaving it): remove our claim if it is still ours, and our heartbeat."""
        if self._mine():
            path(self.out, self.run_id).unlink(missing_ok=True)
            for marker in folder(self.out).glob(f"{self.run_id}.*.takeover"):
                marker.unlink(missing_ok=True)
        _beat_path(self.out, self.run_id, self.token).unlink(missing_ok=True)


def read_beat(out: Path, run_id: str, token: str) -> tuple[float | None, int | None]:
    """(filesystem time, inode) of the heartbeat of claim ``token``; (None, None) if it has none."""
    stamp = _stamp(_beat_path(out, run_id, token))
    return stamp if stamp else (None, None)


def held(out: Path) -> dict[str, dict]:
    """run_id -> claim (as ``read`` gives it) of every claim in ``out``, stale ones included."""
    found = {}
    for f in sorted(folder(out).glob("*.json")) if folder(out).is_dir() else []:
        claim = read(out, f.stem)
        if claim is not None:
            found[f.stem] = claim
    return found

