"""How the command line meets Ctrl-C and SIGTERM: SIGTERM (`kill`, `timeout`, a job scheduler's stop) ends a
command as Ctrl-C does, through its `finally` blocks (temp files removed, locks released), with "terminated" and
exit code 143 ("interrupted", 130); from the first moment, while torch is still importing, to the last. This
module imports nothing heavy, so that `__main__` can start here."""

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
    """`python -m stablesr_min`: `main`, which imports the command line (app/cli.py, torch: seconds) and runs
    it; a stop during that import, or outside a command, ends as one during a command does; a stop once it has
    ended changes nothing."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    # The command has ended and said so: a stop that arrives while Python shuts down changes nothing
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
