"""The patch-token cache: every image's patch tokens after ln_post and the projection, [n, grid², E] in fp16, in a
raw file that a batch reads through a memory map (about 3 GB for Office-Home, over 100 GB for DomainNet: never
whole in RAM). A small checksummed manifest (`trip.safefile`) names the images it was made from (as the other
cache files) and holds a SHA-256 per chunk of rows; a chunk is verified the first time a process reads it, so a
100 GB file is not hashed at every start. A bad chunk, or a file that does not match its manifest, is rebuilt
with a warning; the rebuilt tokens are the same, so a run that meets one mid-way goes on unchanged."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from trip import safefile

CHUNK_BYTES = 64 << 20  # a chunk's rows are verified together on their first read


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


class RawWriter:
    """Writes batches of patch tokens to a temporary file; on a clean exit it replaces `path` and writes the
    manifest (chunk checksums and `meta`). On an error the temporary file is removed and nothing is replaced."""

    def __init__(self, path: Path, meta: dict[str, str]):
        self.path, self.meta = path, meta
        self.tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        self.row_shape: tuple[int, ...] = (0, 0)
        self.rows = 0

    def __enter__(self) -> RawWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in __exit__)
        return self

    def write(self, patches: torch.Tensor) -> None:  # [b, P, E]
        arr = patches.detach().to(torch.float16).cpu().contiguous().numpy()
        self.row_shape = tuple(arr.shape[1:])
        self.file.write(arr.tobytes())
        self.rows += len(arr)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                manifest_path(self.path).unlink(missing_ok=True)  # an old manifest never describes the new bytes
                os.replace(self.tmp, self.path)
                safefile.write_json(manifest_path(self.path), {**self.meta, **self._layout()})
        finally:
            self.tmp.unlink(missing_ok=True)

    def _layout(self) -> dict:
        row_bytes = 2 * int(np.prod(self.row_shape))
        chunk_rows = max(1, CHUNK_BYTES // max(1, row_bytes))
        chunks = []
        with open(self.path, "rb") as f:
            while block := f.read(chunk_rows * row_bytes):
                chunks.append(hashlib.sha256(block).hexdigest())
        return {"shape": [self.rows, *self.row_shape], "chunk_rows": chunk_rows, "chunks": chunks}


class PatchFile:
    """A verified view of a patch-token file; `rows` reads the tokens of some images."""

    def __init__(self, path: Path, manifest: dict, rebuild: Callable[[], None]):
        self.path, self.rebuild = path, rebuild
        self.shape = tuple(manifest["shape"])
        self.chunk_rows, self.chunks = int(manifest["chunk_rows"]), list(manifest["chunks"])
        self.verified: set[int] = set()
        self.map = np.memmap(path, np.float16, "r", shape=self.shape) if self.shape[0] else None

    @classmethod
    def open(cls, path: Path, meta: dict[str, str], rebuild: Callable[[], None]) -> PatchFile | None:
        """The file if its manifest is whole and names these images and its size matches; else None."""
        if not path.is_file() or not manifest_path(path).is_file():
            return None
        try:
            manifest = safefile.read_json(manifest_path(path))
            if any(manifest.get(k) != v for k, v in meta.items()):
                return None  # made from other images, or the images changed: recompute (as the feature cache)
            expected = 2 * int(np.prod(manifest["shape"]))
            if path.stat().st_size != expected:
                raise safefile.BadFile(f"{path.stat().st_size} bytes, expected {expected}")
            return cls(path, manifest, rebuild)
        except (safefile.BadFile, KeyError, TypeError, ValueError) as err:
            safefile.warn_rebuild("patch-token cache", path, err)
            return None

    def __len__(self) -> int:
        return self.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """[b, P, E] fp32 tokens of the images at `index` (only their rows are read)."""
        idx = index.cpu().numpy()
        for chunk in sorted(set((idx // self.chunk_rows).tolist()) - self.verified):
            if not self._chunk_ok(chunk):
                safefile.warn_rebuild("patch-token cache", self.path, f"chunk {chunk} does not match its checksum")
                self.rebuild()
                fresh = safefile.read_json(manifest_path(self.path))
                self.__init__(self.path, fresh, self.rebuild)
                return self.rows(index)
            self.verified.add(chunk)
        return torch.from_numpy(np.ascontiguousarray(self.map[idx])).float()

    def _chunk_ok(self, chunk: int) -> bool:
        row_bytes = 2 * int(np.prod(self.shape[1:]))
        with open(self.path, "rb") as f:
            f.seek(chunk * self.chunk_rows * row_bytes)
            block = f.read(self.chunk_rows * row_bytes)
        return hashlib.sha256(block).hexdigest() == self.chunks[chunk]
