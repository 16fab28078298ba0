"""Progress as log lines when stderr is not a terminal (no bar): one line every N steps with the
epoch's ETA, and the run's ETA on each epoch line. One implementation for both tasks: the
engine's ``run_epoch`` calls :class:`StepLog`; the trainers add :func:`run_eta` to their epoch line.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_LOG_EVERY = 20  # steps between log lines when stderr is not a terminal


def log_every_for(quiet: bool, tty: bool) -> int:
    """Steps between log lines: none when quiet or when a progress bar shows (a terminal)."""
    return 0 if quiet or tty else DEFAULT_LOG_EVERY


def fmt_duration(seconds: float) -> str:
    s = max(0, int(round(seconds)))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s"


def run_eta(done: int, total: int, elapsed: float) -> str:
    """ " ETA ..." for ``total`` epochs after ``done`` took ``elapsed`` seconds ("" when nothing is left)."""
    if done <= 0 or done >= total:
        return ""
    return f"  ETA {fmt_duration(elapsed / done * (total - done))}"


class StepLog:
    """Echo ``desc step i/total loss ... s/step ETA ...`` every ``every`` steps (and at the last step)."""

    def __init__(self, echo: Callable[[str], None], every: int, total: int | None, desc: str) -> None:
        self.echo, self.every, self.total, self.desc = echo, every, total, desc
        self.t0 = time.perf_counter()

    def step(self, i: int, loss: float) -> None:
        """After step ``i`` (1-based) with the running mean ``loss``."""
        if self.every <= 0 or (i % self.every and i != self.total):
            return
        per = (time.perf_counter() - self.t0) / i
        total = f"/{self.total}" if self.total else ""
        eta = f" ETA {fmt_duration(per * (self.total - i))}" if self.total else ""
        self.echo(f"{self.desc} step {i}{total} loss {loss:.4f} {per:.2f} s/step{eta}")


__all__ = ["DEFAULT_LOG_EVERY", "StepLog", "fmt_duration", "log_every_for", "run_eta"]
