"""The one exception type a user can cause: the CLI prints its message and exits with status 2."""

from __future__ import annotations

import errno
from pathlib import Path


class TripError(Exception):
    """A problem with the user's input or environment. The message names the cause and the fix."""


def cannot_write(path: Path, err: OSError, what: str = "", size: int | None = None) -> TripError:
    """A failed write of `path` (a file, or a folder made whole) as one message naming it and what it needs:
    free space (`size` bytes, where known) or write permission in its folder."""
    where = f"{what} {path}" if what else str(path)
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"it needs {_megabytes(size)} free there" if size else "it needs more free space there"
        fix += ": free some, or choose another disk"
    elif err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"it needs write permission in {path.parent}: make it writable, or choose another place"
    else:
        fix = "check the disk and the folder"
    return TripError(f"cannot write {where}: {err.strerror or err}; {fix}")


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.1f} kB"
