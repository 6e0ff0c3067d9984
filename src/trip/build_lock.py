"""One builder per cache file: an exclusive `flock` on `<file>.lock` beside it, held while the file is loaded or
built. A second process that needs the same file waits for the first and then loads what it wrote, instead of
building it too. The kernel drops the lock when its process ends, however it ends, so a crashed builder never
blocks the next one (which finds no file, or a damaged one, and builds it again)."""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def build_lock(target: Path, what: str) -> Iterator[None]:
    """Hold the lock of `target` (whose building `what` describes) for the block, waiting for another holder
    with one line saying so. Where no lock file can be made (a read-only cache), the block runs unlocked: it
    can only read there, and reading needs no lock."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.with_name(target.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another trip process {what} ({target})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
