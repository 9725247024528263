"""Progress of long work: a bar on a terminal, a line per step of news elsewhere (nohup, Slurm logs, workers).

What is printed is for whoever watches; a console that goes away (a closed pipe, `| head`, a dropped SSH
connection) must never stop or fail the training, which goes on recording to its folder: ``say`` swallows
the output errors and sends later output to /dev/null.
"""
from __future__ import annotations

import os
import sys
import time

_gone = False  # the console went away: nothing more is printed


def say(text: str, err: bool = False) -> None:
    """Print a line (to stderr with ``err``), flushed; if the console has gone (a closed pipe or terminal), say
    nothing, now and later, and never raise."""
    global _gone
    if _gone:
        return
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except (BrokenPipeError, OSError, ValueError):  # ValueError: a stream closed under us
        _gone = True
        _silence()


def _silence() -> None:
    """Point stdout and stderr at /dev/null: Python's own flush at exit would raise BrokenPipeError again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            try:
                os.dup2(null, stream.fileno())
            except (OSError, ValueError):
                pass
    except OSError:
        pass


class Progress:
    """Enabled: a tqdm bar on a terminal; elsewhere (nohup, a Slurm log, a worker process) one line per
    evaluation point, so a long run is never silent. Disabled: nothing (tests, rank > 0)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.total, self.done, self.desc, self.t0 = total, initial, desc, time.perf_counter()
        self.start = initial
        self.lines = enabled and not sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False,
                        disable=None if enabled else True, dynamic_ncols=True)

    def step(self, n: int = 1) -> None:
        self.done += n
        self._quietly(self.bar.update, n)

    def show(self, **values) -> None:
        self._quietly(self.bar.set_postfix, values, refresh=False)
        if self.lines:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(self.done - self.start, 1) * (self.total - self.done)
            say(f"{self.desc}: step {self.done}/{self.total}, " + ", ".join(f"{k} {v}" for k, v in values.items())
                + f", {duration(elapsed)} so far, about {duration(left)} left")

    def close(self) -> None:
        self._quietly(self.bar.close)

    def _quietly(self, fn, *args, **kwargs) -> None:
        """The bar's own drawing, whose terminal may have gone: then no bar, and the training goes on."""
        global _gone
        if _gone:
            self.bar.disable = True
            return
        try:
            fn(*args, **kwargs)
        except (BrokenPipeError, OSError, ValueError):
            _gone = True
            self.bar.disable = True
            _silence()


def duration(seconds: float) -> str:
    """'42 s', '7 min', '2.5 h'."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
