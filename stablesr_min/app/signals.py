"""How the command line meets Ctrl-C and SIGTERM: SIGTERM (`kill`, `timeout`, a job scheduler's stop) ends a
command as Ctrl-C does, through its `finally` blocks (temp files removed, locks released), with "terminated" and
exit code 143 ("interrupted", 130); from the first moment, while torch is still importing, to the command's end.
This module imports nothing heavy, so that `__main__` can start here."""

from __future__ import annotations

import signal
import sys
from contextlib import contextmanager
from typing import Callable

from ..errors import Terminated


def raise_terminated(signum, frame) -> None:
    """A SIGTERM handler: `Terminated` where the program is."""
    raise Terminated()


@contextmanager
def terminate_on_sigterm():
    """SIGTERM (`kill`, a job scheduler's stop) raises `Terminated` instead of ending the process on the
    spot, so that temp files are removed; the previous handler is back afterwards."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command_line(main: Callable[[], int]) -> None:
    """`python -m stablesr_min`: `main`, which imports the command line (app/cli.py, torch: seconds), reads it
    and runs the command, which says itself how a stop ended it. A stop while the program starts (the command
    not run yet) ends with exit code 130 or 143 too, saying that nothing was done; a stop once `main` has
    returned changes nothing."""
    signal.signal(signal.SIGTERM, raise_terminated)
    code = None
    try:
        code = main()
        ignore_stops()
    except (KeyboardInterrupt, Terminated) as stop:
        if code is None:
            word, code = ("interrupted", 130) if isinstance(stop, KeyboardInterrupt) else \
                ("terminated", 128 + signal.SIGTERM)
            print(f"{word} while starting, before the command did anything: run the same command again",
                  file=sys.stderr)
        ignore_stops()
    sys.exit(code)


def ignore_stops() -> None:
    """The command has ended and said so: a stop that arrives while Python shuts down changes nothing."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
