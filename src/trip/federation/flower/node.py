"""What a process of the federation holds: the frozen CLIP, the methods, and the cached frozen features of the
domains it serves, built once per process and experiment (module level, not Context.state: the state is
serialized with every message, and the backbone must stay in memory between messages)."""

from __future__ import annotations

from pathlib import Path

from trip.config import ExperimentCfg
from trip.data.datasets import DatasetSpec, get_dataset
from trip.errors import TripError
from trip.methods.base import Method
from trip.workspace import Workspace, prepare

_workspaces: dict[str, Workspace] = {}  # one entry: the experiment this process serves now


def workspace(cfg: ExperimentCfg, domains: list[str], data_root: str | None = None) -> Workspace:
    """A workspace holding `domains` (possibly none); `data_root` (a SuperNode's) overrides cfg.data.root. A
    process that serves several domains of one experiment in turn (a ray actor of `--engine flower-sim` runs the
    virtual nodes of every domain) keeps them all: a new domain rebuilds the workspace with it added."""
    if data_root:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": data_root})})
    key = cfg.model_dump_json()
    held = _workspaces.get(key)
    if held is None or not set(domains) <= held.domains.keys():
        _workspaces.clear()
        _workspaces[key] = prepare(cfg, only=sorted({*domains, *(held.domains if held else ())}))
    return _workspaces[key]


def check_site_data(cfg: ExperimentCfg, data_root: str, declared: str | None) -> None:
    """A deployed SuperNode takes part only in runs on its own data set: the one it declares (`--dataset`,
    compared by `node_domain`) or, without one, one its data root holds. Never write a data set into a site's
    data root that the site did not ask for (the synthetic one is generated on first use)."""
    spec = get_dataset(cfg.data.name)
    if declared is None and not holds(Path(data_root), spec):
        raise TripError(f"this SuperNode's data root {data_root} holds no {spec.name} data set, and the run is on "
                        f"{spec.name}: submit runs on this site's data set, or restart the SuperNode with "
                        f"--dataset {spec.name} and its data under --data-root")


def holds(root: Path, spec: DatasetSpec) -> bool:
    """Whether `root` holds the data set: its folder, or its domain folders right there."""
    return any((root / name).is_dir() for name in spec.folder_names) or \
        all(any((root / f).is_dir() for f in spec.domain_folders(d)) for d in spec.domains)


def method_of(ws: Workspace, label: str) -> Method:
    for method in ws.methods:
        if method.label == label:
            return method
    raise TripError(f"method {label!r} is not in the experiment ({', '.join(m.label for m in ws.methods)})")
