"""The temporary FLWR_HOME of a local federation: a `trip-flwr-home-*` folder in $TMPDIR, locked (`flock`) for
as long as the trip process that made it lives. The federation removes it when it stops; a trip that was
SIGKILLed could not, and the kernel dropped its lock, so every new federation first removes the homes whose lock
nobody holds. Another user's homes cannot be opened, and are left alone."""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

PREFIX = "trip-flwr-home-"
LOCK = "trip-home.lock"


def make_home() -> tuple[Path, int]:
    """A new home and the descriptor that holds its lock (closing it releases the lock)."""
    remove_orphaned_homes()
    home = Path(tempfile.mkdtemp(prefix=PREFIX))
    staged = home / f"{LOCK}.new"
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(staged, home / LOCK)  # the lock is visible only once held: a sweep never takes a home being made
    return home, fd


def remove_home(home: Path, fd: int) -> None:
    shutil.rmtree(home, ignore_errors=True)
    os.close(fd)


def remove_orphaned_homes() -> None:
    for home in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            fd = os.open(home / LOCK, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue  # being made, another user's, or made before homes were locked
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(home, ignore_errors=True)
        except BlockingIOError:
            pass  # its trip is running
        finally:
            os.close(fd)
