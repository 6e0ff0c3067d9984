"""Per-round checkpoints of one federated run: everything needed to continue it exactly (the global and BMA
tensors, each client's private tensors where the engine holds them, and its latest target upload), in
safetensors (tensors) plus JSON (round, BMA weight sum, the per-round history), checksummed and written atomically
(`trip.safefile`); the last two are kept, so a file cut short by a crash or a full disk leaves the previous one
valid. Nothing is ever unpickled."""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trip import safefile
from trip.errors import TripError
from trip.lost_clients import describe, lost_clients

KEEP = 2


@dataclass
class FederationState:
    """A run between rounds: `next_round` is the first round still to do."""

    next_round: int
    params: dict[str, torch.Tensor]
    bma_params: dict[str, torch.Tensor] | None
    bma_total: float
    history: list[dict]
    privates: list[dict[str, torch.Tensor]] = field(default_factory=list)  # each client's, in client order
    # each client's latest target upload, in client order: what a Flower server, which never holds the
    # private tensors, needs to rebuild the deployed models
    uploads: list[dict[str, torch.Tensor]] = field(default_factory=list)


def run_key(method: str, target: str, seed: int) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{method}__{target}__seed{seed}")


class RunCheckpoints:
    def __init__(self, folder: Path):
        self.folder = folder

    def files(self) -> list[Path]:
        return sorted(self.folder.glob("round-*.safetensors"))

    def save(self, state: FederationState) -> Path:
        tensors = {f"server.{k}": v.detach().cpu().contiguous() for k, v in state.params.items()}
        if state.bma_params is not None:
            tensors |= {f"bma.{k}": v.detach().cpu().contiguous() for k, v in state.bma_params.items()}
        for i, private in enumerate(state.privates):
            tensors |= {f"private{i}.{k}": v.detach().cpu().contiguous() for k, v in private.items()}
        for i, upload in enumerate(state.uploads):
            # an upload may be a private tensor itself (safetensors refuses two names for one memory)
            tensors |= {f"upload{i}.{k}": v.detach().cpu().clone() for k, v in upload.items()}
        meta = {"next_round": str(state.next_round), "bma_total": repr(state.bma_total),
                "history": json.dumps(state.history), "clients": str(len(state.privates)),
                "uploads": str(len(state.uploads))}
        path = self.folder / f"round-{state.next_round - 1:04d}.safetensors"
        try:
            safefile.write_tensors(path, tensors, meta)
        except OSError as err:
            previous = self.files()
            kept = f"the previous checkpoint {previous[-1]} is still valid" if previous else "no earlier checkpoint"
            raise TripError(f"could not write checkpoint {path} ({err.strerror or err}); {kept}. Free disk "
                            f"space and rerun the same command with --resume") from None
        for old in self.files()[:-KEEP]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> FederationState | None:
        """The checkpoint a run resumes from: the newest one that loads, matches its checksum and ends with a
        round that lost no client (`trip.lost_clients`); a bad or short one is reported and skipped. None: no
        checkpoint. Only short ones: refused (going on from them would keep rounds trained without clients)."""
        short = []
        for path in reversed(self.files()):
            try:
                state = _load(path)
            except (safefile.BadFile, ValueError, KeyError) as err:
                _warn_once(f"warning: checkpoint {path} is unreadable or corrupt ({err}); using the one before it")
                continue
            lost = lost_clients(state.history[-1]) if state.history else {}
            if not lost:
                return state
            short.append(f"round {state.next_round - 1} lost {describe(lost)}")
            _warn_once(f"warning: checkpoint {path} is not resumed from: its {short[-1]}; using the one before it")
        if short:
            raise TripError(f"the checkpoints in {self.folder} all end with rounds that lost clients "
                            f"({'; '.join(short)}), and no earlier one is kept: delete {self.folder} to run this "
                            f"(method, held-out domain, seed) again from its first round")
        return None


_WARNED: set[str] = set()  # a resume reads its checkpoint several times (trip.experiment, the engine)


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        print(message, file=sys.stderr)


def _load(path: Path) -> FederationState:
    tensors, meta = safefile.read_tensors(path)
    clients, uploads = int(meta.get("clients", "0")), int(meta.get("uploads", "0"))
    split = {"server": {}, "bma": {}, **{f"private{i}": {} for i in range(clients)},
             **{f"upload{i}": {} for i in range(uploads)}}
    for name, value in tensors.items():
        kind, _, key = name.partition(".")
        split[kind][key] = value
    return FederationState(int(meta["next_round"]), split["server"], split["bma"] or None,
                           float(meta["bma_total"]), json.loads(meta["history"]),
                           [split[f"private{i}"] for i in range(clients)],
                           [split[f"upload{i}"] for i in range(uploads)])
