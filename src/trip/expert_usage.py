"""Expert usage of a run's token-routed methods, computed from the cached routing weights and written to the run
folder (expert_usage.json), where the figures read it: drawing never computes."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from trip import safefile
from trip.methods.trip import Trip
from trip.workspace import Workspace

EXPERT_USAGE_FILE = "expert_usage.json"


def expert_usage(workspace: Workspace) -> dict:
    """Per method with the token router, per phase (train / infer) and domain: the mean mixture weight of each
    expert, and the share of images whose largest weight is that expert's (ties go to the lower index).
    Computed from the cached routing weights of every image of the domain."""
    methods = {}
    for method in workspace.methods:
        if not (isinstance(method, Trip) and method.inputs().routing):
            continue
        phases = {phase: {"capacity": spec.capacity,
                          "domains": {d: _usage(f.routing[spec.key()]) for d, f in workspace.frozen.items()}}
                  for phase, spec in (("train", method.route_train), ("infer", method.route_infer))}
        methods[method.label] = {"num_experts": method.cfg.num_experts, "phases": phases}
    return {"methods": methods}


def _usage(weights: Tensor) -> dict:
    n, m = weights.shape
    share = torch.bincount(weights.argmax(1), minlength=m).double() / max(1, n)
    return {"images": n, "mean_weight": weights.double().mean(0).tolist(), "argmax_share": share.tolist()}


def write(workspace: Workspace, out_dir: Path) -> Path:
    path = out_dir / EXPERT_USAGE_FILE
    safefile.write_text(path, json.dumps(expert_usage(workspace), indent=2))
    return path
