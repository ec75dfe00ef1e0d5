"""Writing files safely: outputs checked before any work, then written atomically.

Atomic file writes: a temp file in the target folder, then a rename. A reader (or a crash) never sees
half a file, and an existing file is replaced only once the new one is complete.

The temp file is flushed to the disk (`fsync`) before the rename, so that after a power loss the final
name holds either the old file or the whole new one; the folder is flushed after the rename, so that the
new name itself survives. A `SIGTERM` reaches the cleanup below too when the program turns it into an
exception (`app.signals.terminate_on_sigterm`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UsageError


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)`, then move the temp file to `path` with a normal file's permissions."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes the file private
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # Windows cannot open a folder to flush it
        fsync(path.parent)


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's) data from the OS cache to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output_folder(folder: Path, label: str | None = None) -> None:
    """Refuse now a folder that cannot be created or written to; creates nothing (the caller makes it
    when it writes the first file). A probe file without a name (O_TMPFILE) tests what `access()`
    cannot: read-only mounts, ACLs, and a root user without the override capability."""
    label = label or str(folder)
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{label}: {existing} is a file, not a folder; choose another folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"{label}: cannot write in {existing} ({e.strerror}); choose another folder") from None


def check_output_file(path: Path) -> None:
    """A file that can be written: not a folder, in an existing folder that can be written to."""
    if path.is_dir():
        raise UsageError(f"{path}: is a folder; name the file to write")
    check_output_folder(path.parent, label=str(path))
    if not path.parent.exists():
        raise UsageError(f"{path}: the folder {path.parent} does not exist; create it first")
