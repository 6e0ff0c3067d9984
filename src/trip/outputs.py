"""Files the user names for trip to write (`--out`, `-o`): checked before any work, so a bad path costs nothing
and ends in one message instead of a traceback after the work is done."""

from __future__ import annotations

from pathlib import Path

from trip.errors import TripError


def check_writable(path: Path, option: str, example: str) -> Path:
    """`path` once it is known that a file can be written there: not a folder, and its folder can be made and
    written. Trying is the only check that holds for every case (permissions, read-only disks, root)."""
    if path.is_dir():
        raise TripError(f"{option} {path} is a folder: give a file name inside it, e.g. {path / example}")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise TripError(f"{option} {path}: {blocker} is a file, not a folder: choose another path")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as err:
        raise TripError(f"{option} {path}: cannot write there ({err.strerror}): choose a file in a folder "
                        f"you can write to") from None
    if not existed:
        path.unlink()
    return path


def write_text(path: Path, text: str, option: str, example: str) -> Path:
    """Write `text` to the file the user named with `option` (`example`: a file name to suggest for a folder)."""
    check_writable(path, option, example)
    try:
        path.write_text(text)
    except OSError as err:
        raise TripError(f"{option} {path}: writing failed ({err.strerror})") from None
    return path
