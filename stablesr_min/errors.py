"""The errors a user can act on. Each carries a one-line message; the command line prints it and exits
with code 2 (no traceback). Every layer raises them; only the application catches them."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input from the user (an option, a path, a combination): printed as one line, exit code 2."""


class OptionError(UsageError, ValueError):
    """An option out of its range, named by its field (`dec_w must be in [0, 1], got 2`): the command line
    names the field's flag instead (`--dec-w must be ...`)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


class ConfigError(UsageError, ValueError):
    """A model config's field that cannot build the networks, or that the config has not, named by its place in
    the config (`vae.ch_mult must be ...`), and by the file it came from (`where`) once that is known."""

    def __init__(self, field: str, problem: str, where: str | None = None):
        super().__init__(f"{where + ': ' if where else ''}{field} {problem}")
        self.field, self.problem = field, problem


class WeightsError(ValueError):
    """A weights file that does not fit: the message is one line a user can act on. `kind`: what the file
    looks like instead (a `weights.CHECKPOINT_KINDS` key), where that was told, so that the command line can
    say which option takes it."""

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        self.kind = kind


class DataError(ValueError):
    """Training data that cannot be used: the message is one line a user can act on."""


class ImageError(ValueError):
    """An input image that cannot be used: the message is one line a user can act on."""


USER_ERRORS = (UsageError, WeightsError, DataError, ImageError)  # each printed as one line, exit code 2


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks (temp files) run on the way out;
    the command line ends with "terminated", exit code 143."""
