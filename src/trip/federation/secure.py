"""Secure aggregation (`federation.secure_aggregation`, Flower's SecAgg+; docs/federation.md "Secure
aggregation"): which runs can use it, what a SuperNode may send into it, and how far its aggregate may lie from
plain weighted FedAvg.

The unit of secrecy is a SuperNode: a node sums the updates of the clients it serves (it trained them, on its own
data), pre-scales the sum by its weight, and only the sum over the nodes is ever unmasked at the server."""

from __future__ import annotations

from typing import TYPE_CHECKING

from trip.config import ExperimentCfg, FederationCfg, SecAggCfg
from trip.errors import TripError

if TYPE_CHECKING:  # the CLI checks the engine before torch is imported
    from trip.methods.base import Method


def check_engine(cfg: ExperimentCfg, engine: str) -> None:
    if cfg.federation.secure_aggregation and engine == "inprocess":
        raise TripError("federation.secure_aggregation needs a Flower engine: run with --engine flower or flower-sim "
                        "(in one process every client's update is in the server's hands anyway)")


def check(fed: FederationCfg, methods: list[Method], node_weights: dict[str, list[int]]) -> None:
    """Refuse what secure aggregation cannot do. `node_weights`: per SuperNode of a run (a source domain, or a
    client under flower-sim), the FedAvg weights of its clients, where the caller knows them (a deployed
    ServerApp does not)."""
    for method in methods:
        if method.upload_params:
            raise TripError(f"method {method.label} uploads each client's tensors for the held-out domain "
                            f"(target_upload), which secure aggregation would hide from the server: choose a "
                            f"target mode that needs no per-client upload (FedOTP: global_only or "
                            f"global_plus_init), or set federation.secure_aggregation: false")
    sa = fed.secagg
    if len(node_weights) * sa.quantization_range >= sa.modulus_range:
        raise TripError(f"secure aggregation over {len(node_weights)} SuperNodes overflows modulus_range: lower "
                        f"federation.secagg.quantization_range below {sa.modulus_range // len(node_weights)}")
    for method in methods:
        for node, weights in node_weights.items():
            check_weight(sum(weights) if method.aggregation == "weighted" else len(weights), sa, node)


def check_weight(weight: float, sa: SecAggCfg, node: str) -> None:
    """A node's weight above max_weight would scale its update up instead of down and may overflow the sum."""
    if weight > sa.max_weight:
        raise TripError(f"SuperNode {node} weighs {weight:g} (the weights of its clients), more than "
                        f"federation.secagg.max_weight {sa.max_weight:g}: set max_weight to at least {weight:g}")


def check_prescaled(max_abs: float, weight: float, sa: SecAggCfg, node: str) -> None:
    """SecAgg+ clips a pre-scaled value beyond clipping_range without a word; trip refuses the update instead."""
    prescaled = max_abs * quantized_ratio(weight, sa)
    if prescaled > sa.clipping_range:
        raise TripError(f"SuperNode {node}: its update, pre-scaled by weight/max_weight, reaches {prescaled:.4g}, "
                        f"beyond federation.secagg.clipping_range {sa.clipping_range:g}, where SecAgg+ would clip "
                        f"it: raise clipping_range to at least {prescaled:.4g}")


def quantized_ratio(weight: float, sa: SecAggCfg) -> float:
    """The factor a SuperNode's update is pre-scaled by: weight / max_weight on SecAgg+'s grid of 1/T."""
    return round(weight / sa.max_weight * sa.quantization_range) / sa.quantization_range


def aggregation_bound(node_weights: list[float], max_abs: float, sa: SecAggCfg, clients: int) -> float:
    """The largest difference, in any entry, between the SecAgg+ aggregate and plain weighted FedAvg of the same
    updates: n SuperNodes of weights w_i, `clients` clients in all, no update entry larger than `max_abs` and no
    pre-scaled one beyond clipping_range (docs/federation.md derives it)."""
    n, step = len(node_weights), 2 * sa.clipping_range / sa.quantization_range
    total = sum(quantized_ratio(w, sa) for w in node_weights)
    quantization = n * 2 * step / total  # stochastic rounding (< 1 step) and Flower's float32 arithmetic (< 1)
    weights = n * max_abs / (sa.quantization_range * total)  # the weights rounded to 1/T
    return quantization + weights + 2 * (clients + 1) * 2**-23 * max_abs  # float32 averages on both sides
