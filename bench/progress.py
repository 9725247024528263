"""Progress of long work: a bar on a terminal, a line per step of news elsewhere (nohup, Slurm logs, workers)."""
from __future__ import annotations

import sys
import time


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
        self.bar.update(n)

    def show(self, **values) -> None:
        self.bar.set_postfix(values, refresh=False)
        if self.lines:
            elapsed = time.perf_counter() - self.t0
            left = elapsed / max(self.done - self.start, 1) * (self.total - self.done)
            print(f"{self.desc}: step {self.done}/{self.total}, " + ", ".join(f"{k} {v}" for k, v in values.items())
                  + f", {duration(elapsed)} so far, about {duration(left)} left", flush=True)

    def close(self) -> None:
        self.bar.close()


def duration(seconds: float) -> str:
    """'42 s', '7 min', '2.5 h'."""
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
