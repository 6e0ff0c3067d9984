"""A SuperNode's copy of its clients' private tensors on its own disk, one file per (run, client, round), so
that a Flower run killed with its nodes resumes each client from where it was. The files never leave the node.

A resumed run's first train message for client k in round r takes the newest file of a round before r: rounds
from r on may have been trained by the killed run after the server's last checkpoint, and are trained again."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from flwr.app import UserConfig

from trip import safefile
from trip.checkpoint import KEEP, run_key
from trip.federation.flower.protocol import RunSpec
from trip.methods.base import Tensors

STATE_DIR = "state-dir"  # node config: the folder of the node's private state (a deployment: under --data-root)
_FILE = re.compile(r"client-(\d+)\.round-(\d+)\.safetensors")


class PrivateStore:
    def __init__(self, folder: Path):
        self.folder = folder

    @classmethod
    def of(cls, node_config: UserConfig, spec: RunSpec, domain: str) -> PrivateStore | None:
        """The node's store for this run: under its node config's state-dir; for a simulated node (no state-dir,
        no named domain: it runs on the run's own machine) beside the server's checkpoints. None otherwise (the
        private state is then lost with the process)."""
        root = node_config.get(STATE_DIR)
        if root:
            return cls(Path(str(root)) / run_key(spec.method, spec.target, spec.seed) / f"node-{domain}")
        if "domain" not in node_config and spec.checkpoint_dir:
            return cls(Path(spec.checkpoint_dir) / f"node-{domain}")
        return None

    def save(self, k: int, r: int, private: Tensors) -> None:
        safefile.write_tensors(self._path(k, r), private)
        # a server checkpoint falls back at most KEEP - 1 rounds, and the killed run ran at most one round past it
        for old in self._rounds(k)[:-(KEEP + 1)]:
            self._path(k, old).unlink(missing_ok=True)

    def latest_before(self, k: int, r: int) -> Tensors | None:
        """Client k's private tensors after its last round before r (None: it has none saved)."""
        for done in reversed([d for d in self._rounds(k) if d < r]):
            try:
                return safefile.read_tensors(self._path(k, done))[0]
            except safefile.BadFile as err:
                print(f"warning: private state {self._path(k, done)} is corrupt ({err}); using the one before it",
                      file=sys.stderr)
        return None

    def _rounds(self, k: int) -> list[int]:
        found = (_FILE.fullmatch(p.name) for p in self.folder.glob(f"client-{k}.round-*.safetensors"))
        return sorted(int(m[2]) for m in found if m and int(m[1]) == k)

    def _path(self, k: int, r: int) -> Path:
        return self.folder / f"client-{k}.round-{r:04d}.safetensors"
