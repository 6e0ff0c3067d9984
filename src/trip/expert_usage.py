"""Expert usage of a run's token-routed methods, computed from the cached routing weights and written to the run
folder (expert_usage.json), where the figures read it: drawing never computes. Beside the usage, two router
diagnostics (docs/figures.md "Router diagnostics"): collapse, one expert receiving most of a domain's tokens, and
redundancy, how much the experts' token shares overlap across the domain's images."""

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
    expert, the share of images whose largest weight is that expert's (ties go to the lower index), whether the
    router collapsed there, and the experts' redundancy. Computed from the cached routing weights of every image
    of the domain."""
    methods = {}
    for method in workspace.methods:
        if not (isinstance(method, Trip) and method.inputs().routing):
            continue
        experts = method.cfg.num_experts
        phases = {phase: {"capacity": spec.capacity, "collapse_threshold": collapse_threshold(experts),
                          "domains": {d: domain_usage(f.routing[spec.key()]) for d, f in workspace.frozen.items()}}
                  for phase, spec in (("train", method.route_train), ("infer", method.route_infer))}
        methods[method.label] = {"num_experts": experts, "phases": phases}
    return {"methods": methods}


def domain_usage(weights: Tensor) -> dict:
    """One domain's entry: `weights` [n, M], each image's shares of its kept tokens per expert."""
    n, m = weights.shape
    share = torch.bincount(weights.argmax(1), minlength=m).double() / max(1, n)
    mean = weights.double().mean(0)
    pairs = redundancy_pairs(weights)
    return {"images": n, "mean_weight": mean.tolist(), "argmax_share": share.tolist(),
            "collapsed": bool(mean.max() > collapse_threshold(m)), "redundancy": redundancy(pairs),
            "redundancy_pairs": pairs.tolist()}


def collapse_threshold(num_experts: int) -> float:
    """The share of a domain's kept tokens (the mean mixture weight) above which one expert counts as having
    taken over: halfway between a balanced router (1/M) and a collapsed one (1), so that the expert is closer to
    holding every token than to its fair share. 62.5 % at M = 4, 75 % at M = 2; never reached at M = 1."""
    return (1 + 1 / num_experts) / 2


def redundancy_pairs(weights: Tensor) -> Tensor:
    """[M, M] the weighted Jaccard overlap of two experts' per-image token shares over a domain's images:
    Σ_i min(w_ia, w_ib) / Σ_i max(w_ia, w_ib), 1 on the diagonal. 1: the two receive the same share of every
    image's tokens, so the mixture never tells them apart; 0: never a token of the same image. An expert that
    never receives a token overlaps 0 with every expert. `weights` [n, M]: each image's shares of its kept tokens
    per expert."""
    w = weights.double()
    low = torch.minimum(w[:, :, None], w[:, None, :]).sum(0)
    high = torch.maximum(w[:, :, None], w[:, None, :]).sum(0)
    return torch.where(high > 0, low / high, 0.0)


def redundancy(pairs: Tensor) -> float | None:
    """The mean of `redundancy_pairs` over the M(M-1)/2 pairs of distinct experts; None for one expert."""
    m = pairs.shape[0]
    if m < 2:
        return None
    upper = torch.triu_indices(m, m, offset=1)
    return pairs[upper[0], upper[1]].mean().item()


def collapse_warnings(usage: dict) -> list[str]:
    """One line per method, phase and domain where the router collapsed (`collapse_threshold`)."""
    lines = []
    for label, method in usage["methods"].items():
        experts = method["num_experts"]
        for phase, info in method["phases"].items():
            for domain, d in info["domains"].items():
                if d["collapsed"]:
                    top = max(range(experts), key=lambda e: d["mean_weight"][e])
                    lines.append(f"router collapse: {label}, {phase} routing, domain {domain}: expert E{top + 1} "
                                 f"receives {d['mean_weight'][top]:.1%} of the kept tokens (threshold "
                                 f"{info['collapse_threshold']:.1%}, halfway between a balanced router's "
                                 f"{1 / experts:.1%} and all of them)")
    return lines


def write(workspace: Workspace, out_dir: Path) -> dict:
    usage = expert_usage(workspace)
    safefile.write_text(out_dir / EXPERT_USAGE_FILE, json.dumps(usage, indent=2))
    return usage
