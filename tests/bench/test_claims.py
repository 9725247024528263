"""One trainer per run (bench.claims): claims that rest on link(2), rename and the filesystem's timestamps.

Cluster filesystems refuse flock (Lustre without -o flock: ENOSYS; NFSv3 without its lock daemon:
ENOLCK) or grant it per node only (Lustre's localflock, BeeGFS). Claims use no lock at all; the
sweeps below run in three settings of flock (working, raising ENOSYS, granting every caller at
once, as node-local locks do across nodes), set in each subprocess by a sitecustomize module.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from bench import claims, records
from bench.specs import Execution, RunSpec
from bench.train import run_one

CPU = Execution.for_device("cpu")


def _write_claim(out, run_id, age_s=0.0, **fields):
    """A claim made by another trainer (token "other"), its heartbeat ``age_s`` seconds old in the
    filesystem's time (the claim file's mtime; it has no heartbeat file yet)."""
    claims.folder(out).mkdir(parents=True, exist_ok=True)
    claim = dict(run_id=run_id, host=socket.gethostname(), pid=os.getpid(), slurm_task=None, token="other",
                 started=time.time()) | fields
    p = claims.path(out, run_id)
    p.write_text(json.dumps(claim))
    then = claims.fs_now(out) - age_s
    os.utime(p, (then, then))


def test_a_claimed_run_is_skipped_named_and_untouched(tmp_path, tiny):
    from bench.sweep import run_local, status

    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    holder = claims.Claim(tmp_path, spec.run_id)
    holder.acquire()  # this live process holds it
    with pytest.raises(claims.Claimed, match=rf"being trained by .* pid {os.getpid()}"):
        run_one(spec, tmp_path, CPU, progress=False)
    lines = []
    run_local([spec], tmp_path, CPU, progress=False, log=lines.append)
    assert "skipped" in lines[0] and not (tmp_path / "runs").exists() and not (tmp_path / "ckpt").exists()
    st = status(tmp_path).set_index("run_id").loc[spec.run_id]
    assert st["status"] == "running" and f"pid {os.getpid()}" in st["held_by"] and "heartbeat 0 s ago" in st["held_by"]
    holder.release()
    assert run_one(spec, tmp_path, CPU, progress=False)["status"] == "ok"
    assert list(claims.folder(tmp_path).iterdir()) == []  # released when done: claim, heartbeat, nothing left
    with pytest.raises(claims.Skip, match=rf"^{spec.run_id} is already recorded \(ok\)$"):  # never trained twice
        run_one(spec, tmp_path, CPU, progress=False)


def test_a_run_taken_over_while_training_stops_and_writes_nothing(tmp_path, tiny, monkeypatch):
    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")

    def beat(self, interval_s):  # as if another sweep had found this heartbeat stale and taken the run
        raise claims.Claimed(f"{self.run_id} was taken over")

    monkeypatch.setattr(claims.Claim, "beat", beat)
    with pytest.raises(claims.Claimed, match=rf"^{spec.run_id} was taken over$"):
        run_one(spec, tmp_path, CPU, progress=False)
    assert not any(p.exists() for p in records.paths(tmp_path, spec.run_id).values())  # its records are the new holder's


def test_stale_claims_are_taken_over(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cases = [  # (claim fields, may another trainer take it?)
        (dict(pid=dead.pid), True),  # its process on this host is gone (kill -9, crash)
        (dict(host="elsewhere", pid=1), False),  # a live heartbeat elsewhere
        (dict(host="elsewhere", pid=1, age_s=claims.STALE_FIRST_S + 1), True),  # silent for > stale_after_s
        (dict(host="elsewhere", pid=1, age_s=claims.STALE_FIRST_S - 60), False),  # not yet
        (dict(host="elsewhere", pid=1, slurm_task="77_3"), True),  # our own Slurm task, requeued
    ]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    for i, (fields, free) in enumerate(cases):
        _write_claim(tmp_path, f"r{i}", **fields)
        c = claims.Claim(tmp_path, f"r{i}")
        if free:
            c.acquire()
            assert claims.read(tmp_path, f"r{i}")["token"] == c.token
        else:
            with pytest.raises(claims.Claimed, match="elsewhere pid 1"):
                c.acquire()
            assert claims.read(tmp_path, f"r{i}")["token"] == "other"
    claims.path(tmp_path, "junk").write_text("{not json")  # an unreadable claim (a crash of an old version)
    c = claims.Claim(tmp_path, "junk")
    c.acquire()
    assert claims.read(tmp_path, "junk")["token"] == c.token


def test_stale_rule_follows_the_holders_evaluation_intervals(tmp_path):
    c = claims.Claim(tmp_path, "r")
    c.acquire()
    assert claims.read(tmp_path, "r")["stale_after_s"] == claims.STALE_FIRST_S == 1800
    c.beat(100.0)
    assert claims.read(tmp_path, "r")["stale_after_s"] == 500  # 5 x the longest interval
    c.beat(10.0)
    assert claims.read(tmp_path, "r")["stale_after_s"] == 500
    d = claims.Claim(tmp_path, "s")
    d.acquire()
    d.beat(1.0)
    assert claims.read(tmp_path, "s")["stale_after_s"] == claims.STALE_MIN_S == 300
    beat = tmp_path / "claims" / f"r.{c.token}.beat"
    old = claims.fs_now(tmp_path) - 501
    other = claims.read(tmp_path, "r") | dict(host="elsewhere")
    assert claims.is_stale(other, claims.fs_now(tmp_path)) is False
    os.utime(beat, (old, old))  # its heartbeat, 501 s ago by the filesystem's clock: past 5 x 100 s
    other = claims.read(tmp_path, "r") | dict(host="elsewhere")
    assert claims.is_stale(other, claims.fs_now(tmp_path)) is True
    with pytest.raises(ValueError, match="filesystem's time"):
        claims.is_stale(other)  # an age needs a "now" of the same clock


def test_a_trainer_whose_claim_was_taken_over_stops_and_leaves_it(tmp_path):
    c = claims.Claim(tmp_path, "r")
    c.acquire()
    _write_claim(tmp_path, "r", host="elsewhere", token="new-holder")  # taken over while we stalled
    with pytest.raises(claims.Claimed, match="taken over by elsewhere"):
        c.beat(1.0)
    c.release()
    assert claims.read(tmp_path, "r")["token"] == "new-holder"


def test_clocks_that_are_off_neither_take_live_claims_nor_keep_dead_ones(tmp_path, monkeypatch):
    """Ages are differences of the filesystem's timestamps: a holder whose clock runs two hours behind
    (a heartbeat written by it would look two hours old), and a checker whose clock runs two hours
    ahead, leave a live claim alone; a silent claim is stale whatever the checker's clock says."""
    real = time.time
    holder = claims.Claim(tmp_path, "r")
    monkeypatch.setattr(time, "time", lambda: real() - 7200)  # the holder's node
    holder.acquire()
    holder.beat(10.0)
    monkeypatch.setattr(time, "time", lambda: real() + 7200)  # the checker's node, on another host
    held = claims.read(tmp_path, "r") | dict(host="elsewhere")
    assert claims.is_stale(held, claims.fs_now(tmp_path)) is False
    with pytest.raises(claims.Claimed):
        claims.Claim(tmp_path, "r").acquire()
    _write_claim(tmp_path, "s", host="elsewhere", age_s=claims.STALE_FIRST_S + 1)
    monkeypatch.setattr(time, "time", lambda: real() - 7200)  # a checker two hours behind still sees it stale
    taker = claims.Claim(tmp_path, "s")
    taker.acquire()
    assert claims.read(tmp_path, "s")["token"] == taker.token


@pytest.mark.parametrize("wakes", ["before", "after"])
def test_a_holder_that_wakes_while_its_claim_is_taken_over_leaves_one_trainer(tmp_path, monkeypatch, wakes):
    """A stalled holder beats (heartbeat first, then its check) just before or just after a taker replaces
    its claim. Before: its check passes, so it may write; the taker sees the heartbeat move, puts the
    claim back and skips. After: its check fails and it stops; the taker trains. Never both."""
    holder = claims.Claim(tmp_path, "r")
    holder.acquire()
    holder.beat(1.0)
    beat = tmp_path / "claims" / f"r.{holder.token}.beat"
    old = claims.fs_now(tmp_path) - 3600
    os.utime(beat, (old, old))  # stalled for an hour
    path = claims.path(tmp_path, "r")
    path.write_text(json.dumps(json.loads(path.read_text()) | dict(host="stalled-node")))  # on another host
    real_replace, woke = claims.os.replace, []

    def replace_while_the_holder_wakes(src, dst):
        if str(dst) == str(path) and not woke and wakes == "after":
            real_replace(src, dst)
        if str(dst) == str(path) and not woke:
            woke.append(True)
            try:
                holder.beat(1.0)
                woke.append("went on")
            except claims.Claimed:
                woke.append("stopped")
            if wakes == "after":
                return
        real_replace(src, dst)

    monkeypatch.setattr(claims.os, "replace", replace_while_the_holder_wakes)
    taker = claims.Claim(tmp_path, "r")
    if wakes == "before":
        with pytest.raises(claims.Claimed, match="woke while we took it over; left to it"):
            taker.acquire()
        assert woke[1] == "went on" and claims.read(tmp_path, "r")["token"] == holder.token
        holder.beat(1.0)  # and it keeps the run
    else:
        taker.acquire()
        assert woke[1] == "stopped" and claims.read(tmp_path, "r")["token"] == taker.token


_RACE = """
import sys, time, os
from pathlib import Path
from bench import claims
out, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
c = claims.Claim(out, "r")
try:
    c.acquire()
    print("won", c.token)
except claims.Claimed as e:
    print("lost", e)
sys.stdout.flush()
while not (out / "done").exists():  # keep the claim (never release) until every contender has tried
    time.sleep(0.01)
"""


def test_of_several_trainers_that_find_one_stale_claim_at_once_exactly_one_takes_it(tmp_path):
    holder = claims.Claim(tmp_path, "r")
    holder.acquire()
    holder.beat(1.0)
    beat = tmp_path / "claims" / f"r.{holder.token}.beat"
    old = claims.fs_now(tmp_path) - 3600
    os.utime(beat, (old, old))  # its heartbeat stopped an hour ago (it stalled), on another host:
    path = claims.path(tmp_path, "r")
    path.write_text(json.dumps(json.loads(path.read_text()) | dict(host="stalled-node")))
    go = tmp_path / "go"
    env = os.environ | {"PYTHONPATH": str(records.Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tmp_path), str(go)], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(6)]
    time.sleep(2.0)  # every contender is waiting
    go.touch()
    lines = []
    for p in procs:
        lines.append(p.stdout.readline().strip())
    (tmp_path / "done").touch()
    for p in procs:
        p.wait(timeout=60)
    winners = [line for line in lines if line.startswith("won")]
    assert len(winners) == 1, lines
    assert claims.read(tmp_path, "r")["token"] == winners[0].split()[1]
    with pytest.raises(claims.Claimed, match="taken over"):  # the stalled holder wakes: it stops, writes nothing
        holder.beat(1.0)


_FLOCK = """
import errno, fcntl, os
mode = os.environ.get("RESBENCH_TEST_FLOCK")
if mode == "enosys":  # Lustre mounted without -o flock
    def flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    fcntl.flock = fcntl.lockf = flock
elif mode == "everyone":  # node-local locks seen from two nodes: every caller gets the lock
    fcntl.flock = fcntl.lockf = lambda fd, op: None
"""


@pytest.mark.slow  # subprocesses: left out of mutation runs
@pytest.mark.parametrize("flock", ["working", "enosys", "everyone"])
def test_two_sweeps_on_one_folder_train_each_run_exactly_once(tmp_path, flock):
    import re

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_FLOCK)
    root = str(records.Path(__file__).resolve().parents[2])
    env = os.environ | {"PYTHONPATH": f"{site}:{root}", "RESBENCH_TEST_FLOCK": flock}
    out = tmp_path / "out"
    args = [sys.executable, "-m", "bench", "sweep", "--dataset", "synthetic", "--models", "plain,resnet", "--depths",
            "8", "--seeds", "0,1", "--width", "0.25", "--batch-size", "32", "--train-size", "256", "--val-size", "64",
            "--test-size", "64", "--iterations", "16", "--eval-every", "8", "--device", "cpu", "--out", str(out)]
    check = subprocess.run([sys.executable, "-c", "import fcntl; fcntl.flock(0, fcntl.LOCK_EX); print('flock ok')"],
                           env=env, capture_output=True, text=True)
    assert (check.returncode == 0) == (flock != "enosys"), check.stderr  # the simulation is in force
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    trained = [m for o in outs for m in re.findall(r"\] (\w+)\s+seed (\d): ok", o)]
    assert sorted(trained) == sorted([(m, s) for m in ("plain8", "resnet8") for s in "01"]), outs
    assert all("skipped" in o or o.count(": ok") == 4 for o in outs)
    runs = records.load(out)[0]
    assert len(runs) == 4 and (runs["status"] == "ok").all()
    assert list((out / "claims").iterdir()) == []


@pytest.mark.slow  # subprocesses: left out of mutation runs
def test_the_parallel_executor_skips_a_claimed_run_without_recording_a_failure(tmp_path, tiny):
    from bench.sweep import run_parallel

    spec = RunSpec("plain8", tiny, width=0.25, dataset="synthetic")
    held = claims.Claim(tmp_path, spec.run_id)
    held.acquire()  # this (live) test process holds it
    lines = []
    run_parallel([spec], tmp_path, CPU, [{}, {}], log=lines.append)
    assert len(lines) == 1 and "skipped" in lines[0]
    assert not (tmp_path / "runs").exists()  # neither trained nor recorded as failed
    held.release()
