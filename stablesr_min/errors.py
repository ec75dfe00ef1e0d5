"""The errors a user can act on. Each carries a one-line message; the command line prints it and exits
with code 2 (no traceback). Every layer raises them; only the application catches them."""


class UsageError(Exception):
    """Bad input from the user (an option, a path, a combination): printed as one line, exit code 2."""


class WeightsError(ValueError):
    """A weights file that does not fit: the message is one line a user can act on."""


class DataError(ValueError):
    """Training data that cannot be used: the message is one line a user can act on."""


class ImageError(ValueError):
    """An input image that cannot be used: the message is one line a user can act on."""


USER_ERRORS = (UsageError, WeightsError, DataError, ImageError)  # each printed as one line, exit code 2


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that `finally` blocks (temp files) run on the way out;
    the command line ends with "terminated", exit code 143."""
