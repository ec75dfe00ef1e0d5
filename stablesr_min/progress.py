"""Progress on long work: one status line on stderr, and durations as a person reads them."""

from __future__ import annotations

import math
import sys
import time

import torch


class ProgressLine:
    """One status line on stderr: rewritten in place on a terminal, one line per step otherwise."""

    def __init__(self, name: str, steps: int):
        self.name, self.steps, self.step = name, steps, 0
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()

    def tiles(self, done: int, total: int) -> None:
        if self.tty:
            self._write(f"step {self.step + 1}/{self.steps}, tile {done}/{total}", end="\r")

    def step_done(self, step: int, steps: int, x: torch.Tensor) -> None:
        self.step = step
        if self.tty or step == steps or step % max(1, steps // 10) == 0:
            self._write(f"step {step}/{steps}", end="\r" if self.tty and step < steps else "\n")

    def _write(self, text: str, end: str) -> None:
        clear_line = "\x1b[2K" if self.tty else ""
        elapsed = time.monotonic() - self.start
        print(f"{clear_line}{self.name}: {text} ({elapsed:.0f} s)", end=end, file=sys.stderr, flush=True)


def format_seconds(seconds: float) -> str:
    """1h02m, 3m07s; "?" for an unknown (non-finite) time."""
    if not math.isfinite(seconds):
        return "?"
    minutes, s = divmod(round(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"
