"""Timing and peak memory, for the scripts that measure speed (scripts/gpu_check.py, benchmarks/bench.py).
Timing is a script's job, never a test's."""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work (a CPU has none), so that a clock read after it counts that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run: Callable[[], Any]) -> tuple[Any, float]:
    """run()'s result and its wall time in seconds, the device's queued work included."""
    synchronize(device)
    start = time.perf_counter()
    result = run()
    synchronize(device)
    return result, time.perf_counter() - start


def median_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """One warm-up call, then the median wall time of `repeats` calls."""
    run()
    return statistics.median(timed(device, run)[1] for _ in range(repeats))


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new peak; False where the CPU's peak resident set cannot be reset (not Linux)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set becomes the current one
        return True
    except OSError:
        return False


def peak_memory_gb(device: torch.device) -> float:
    """torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak resident set (weights included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
