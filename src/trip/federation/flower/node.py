"""What a process of the federation holds: the frozen CLIP, the methods, and the cached frozen features of the
domains it serves, built once per process and experiment (module level, not Context.state: the state is
serialized with every message, and the backbone must stay in memory between messages)."""

from __future__ import annotations

from trip.config import ExperimentCfg
from trip.errors import TripError
from trip.experiment import Workspace, prepare
from trip.methods.base import Method

_workspaces: dict[str, Workspace] = {}  # one entry: the experiment this process serves now


def workspace(cfg: ExperimentCfg, domains: list[str], data_root: str | None = None) -> Workspace:
    """The workspace of `domains` (possibly none); `data_root` (a SuperNode's) overrides cfg.data.root."""
    if data_root:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": data_root})})
    key = cfg.model_dump_json() + "|" + ",".join(domains)
    if key not in _workspaces:
        _workspaces.clear()
        _workspaces[key] = prepare(cfg, only=domains)
    return _workspaces[key]


def method_of(ws: Workspace, label: str) -> Method:
    for method in ws.methods:
        if method.label == label:
            return method
    raise TripError(f"method {label!r} is not in the experiment ({', '.join(m.label for m in ws.methods)})")
