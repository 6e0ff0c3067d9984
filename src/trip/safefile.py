"""Files that cannot lie: safetensors (or JSON) carrying a SHA-256 of their content, verified on every read,
and written atomically (a temporary file unique to the writer, fsync, rename), so that concurrent writers of one
path never mix their bytes and a reader sees a whole old file or a whole new one. Nothing is ever unpickled."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save_file

from trip.errors import cannot_write


class BadFile(Exception):
    """A file that is unreadable, truncated, altered, or not what its reader expects."""


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
    return h.hexdigest()


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Raises OSError (disk full, no permission); the destination is then left as it was."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "sha256": digest(tensors)}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """-> (tensors, metadata); BadFile unless the file loads and matches its checksum."""
    try:  # one read: metadata and tensors from the same bytes, even while a writer replaces the file
        raw = path.read_bytes()
        (header_len,) = struct.unpack("<Q", raw[:8])
        meta = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
        tensors = load(raw)
    except (SafetensorError, OSError, ValueError, struct.error, AttributeError) as err:
        raise BadFile(f"unreadable: {err}") from None
    if "sha256" not in meta:
        raise BadFile("no checksum")
    if digest(tensors) != meta["sha256"]:
        raise BadFile("checksum mismatch")
    return tensors, meta


def write_json(path: Path, doc: dict) -> None:
    body = json.dumps(doc, sort_keys=True)
    text = json.dumps({"sha256": hashlib.sha256(body.encode()).hexdigest(), "doc": doc}, sort_keys=True)
    _atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path: Path, text: str, what: str = "") -> None:
    """A file of a run folder, written atomically; a failed write (disk full, read-only, no permission) is one
    TripError naming the path and what it needs, and leaves the destination as it was."""
    try:
        _atomic(path, lambda tmp: Path(tmp).write_text(text))
    except OSError as err:
        raise cannot_write(path, err, what, size=len(text.encode())) from None


def read_json(path: Path) -> dict:
    try:
        outer = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadFile(f"unreadable: {err}") from None
    if not isinstance(outer, dict) or not isinstance(outer.get("doc"), dict):
        raise BadFile("not a checksummed document")
    if hashlib.sha256(json.dumps(outer["doc"], sort_keys=True).encode()).hexdigest() != outer.get("sha256"):
        raise BadFile("checksum mismatch")
    return outer["doc"]


def warn_rebuild(what: str, path: Path, err: Exception) -> None:
    print(f"warning: {what} {path} is corrupt ({err}); rebuilding it", file=sys.stderr)


def store_in_cache(write: Callable[[], None], what: str, path: Path) -> None:
    """Writes a cache file where it can: a read-only or full cache (a shared one, say) costs the recomputation
    next time, with a note naming the path, never the run."""
    try:
        write()
    except OSError as err:
        print(f"note: the {what} was not stored in {path} ({err.strerror or err}): it is used now and computed "
              f"again next time; a writable TRIP_CACHE (with free space) keeps it", file=sys.stderr)


def _atomic(path: Path, write: Callable[[str], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):  # none made, or a read-only folder (EROFS even for a missing file)
            tmp.unlink()
