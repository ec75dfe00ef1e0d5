"""A torchrun worker for tests/test_distributed.py: `python -m stablesr_min ...`, except that once a process has
seen the run's stop it waits (up to 60 s) before saving, as a slow save would, and says so by creating the file
STOP_MARKERS/rank<N>. At the test's sizes a step and its save take milliseconds, so a second Ctrl-C would
otherwise land before or after the window it is meant to test, depending on the machine.
"""

import os
import runpy
import time
from pathlib import Path

from stablesr_min.train import loop

seen_by_all = loop.first_signal  # where Loop looks it up


def first_signal_then_wait(procs, requested):
    stop = seen_by_all(procs, requested)
    if stop is not None:
        (Path(os.environ["STOP_MARKERS"]) / f"rank{procs.rank}").touch()
        time.sleep(60)  # the second signal ends this (KeyboardInterrupt)
    return stop


loop.first_signal = first_signal_then_wait
runpy.run_module("stablesr_min", run_name="__main__")  # the entry point itself (it sets MKL_CBWR, as it says why)
