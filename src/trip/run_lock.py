"""One writer per run folder: an exclusive `flock` on a file in the folder, held for the whole run. The kernel
drops it when the process ends, however it ends, so a crashed run never leaves the folder locked."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from trip.errors import TripError

LOCK_FILE = ".trip-run.lock"  # not content of the run: a folder holding only this one is empty
_held: set[Path] = set()  # run folders this process holds: the CLI takes the lock before run_experiment does


@contextmanager
def run_folder_lock(out: Path) -> Iterator[None]:
    """Make `out` if needed and hold its lock; refuse at once, naming the holder, while another process has it.
    Re-entrant within a process (a second flock of the same file from this process would refuse itself)."""
    if out.resolve() in _held:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC (Python's default, explicit here): a process trip starts must never hold the lock on.
        fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as err:
        files = [p for p in (out, *out.parents) if p.is_file()]
        what = f"cannot be written ({err.strerror})" if not files else \
            "is a file" if files[0] == out else f"is inside a file ({files[0]})"
        raise TripError(f"run folder {out} {what}: choose another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TripError(f"run folder {out} is in use by {_holder(fd)}: wait for that run to end (or stop "
                            f"it), or choose another --out") from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        _held.add(out.resolve())
        yield
    finally:
        _held.discard(out.resolve())
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        h = json.loads(os.pread(fd, 65536, 0))
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not written its name yet)"


def remove_unused(out: Path) -> None:
    """Remove a run folder that a failed start left holding nothing but its lock file."""
    try:
        if [p.name for p in out.iterdir()] == [LOCK_FILE]:
            (out / LOCK_FILE).unlink()
            out.rmdir()
    except OSError:
        pass  # the folder stays: harmless, and never worth hiding the error that ended the run
