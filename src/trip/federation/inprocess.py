"""The in-process engine: one machine, source clients in turn, every round (spec §1.4)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from trip.checkpoint import FederationState
from trip.config import TrainCfg
from trip.errors import TripError
from trip.federation.client import NonFiniteError, accuracy, client_update, round_seed
from trip.federation.server import BMA, fedavg
from trip.methods.base import Method, Split


@dataclass
class Client:
    domain: str
    train: Split
    val: Split
    weight: int  # FedAvg weight: the images the client holds, or its train split (train.fedavg_weight)


RoundLogger = Callable[[dict], None]


def evaluate(method: Method, models: dict, clients: list[Client], target: Split) -> dict:
    """Source-validation accuracy per client, their mean, and target accuracy, for each model."""
    out = {}
    for name, params in models.items():
        val = {c.domain: accuracy(method, params, c.val) for c in clients}
        out[name] = {"val": val, "val_mean": sum(val.values()) / len(val),
                     "target": accuracy(method, params, target)}
    return out


@dataclass
class FederationResult:
    history: list[dict]  # one record per round (round 0 alone for an untrained method)
    models: dict[str, dict]  # final "server" (and "bma") tensors


def run_federation(method: Method, clients: list[Client], target: Split, train: TrainCfg, seed: int,
                   log: RoundLogger, *, resume: FederationState | None = None,
                   on_round: Callable[[FederationState], None] | None = None) -> FederationResult:
    """All rounds, or those after `resume`; `on_round` gets the state after each (for checkpoints)."""
    params = method.init_params(seed)
    if not method.trainable:
        record = {"round": 0, "eval": evaluate(method, {"server": params}, clients, target)}
        log(record)
        return FederationResult([record], {"server": params})
    bma = BMA(params, train.rounds, method.cfg.bma_beta, method.cfg.bma_include_init) if method.uses_bma else None
    history, first = [], 0
    if resume is not None:
        params, history, first = resume.params, list(resume.history), resume.next_round
        if bma is not None:
            bma.params, bma.total = resume.bma_params, resume.bma_total
    for r in range(first, train.rounds):
        params, record = _round(method, clients, target, train, seed, r, params, bma)
        log(record)
        history.append(record)
        if on_round is not None:
            on_round(FederationState(r + 1, params, bma.params if bma else None, bma.total if bma else 0.0, history))
    return FederationResult(history, {"server": params} | ({"bma": bma.params} if bma else {}))


def _round(method: Method, clients: list[Client], target: Split, train: TrainCfg, seed: int, r: int,
           params: dict, bma: BMA | None) -> tuple[dict, dict]:
    start = time.perf_counter()
    lr = train.lr * train.lr_decay**r
    updates, failed = {}, {}
    for i, c in enumerate(clients):
        try:
            updates[c.domain] = client_update(method, params, c.train, train, lr, round_seed(seed, r, i),
                                              where=f"client {c.domain}, round {r}")
        except NonFiniteError as err:
            print(f"warning: {err}", file=sys.stderr)
            failed[c.domain] = str(err)
    if not updates:
        raise TripError(f"round {r}: every client failed ({'; '.join(failed.values())}); stopping with the "
                        f"global state of round {r - 1} unchanged")
    params = fedavg([u.params for u in updates.values()], [c.weight for c in clients if c.domain in updates])
    if bma is not None:
        bma.update(params, r)
    models = {"server": params} if bma is None else {"server": params, "bma": bma.params}
    record = {"round": r, "lr": lr, "train_loss": {d: u.loss for d, u in updates.items()},
              "participants": list(updates), "failed": failed, "eval": evaluate(method, models, clients, target),
              "time_s": time.perf_counter() - start}
    return params, record


def select_round(history: list[dict], model: str) -> dict:
    """The round with the best mean source-validation accuracy of `model` (first one on ties, as the
    official strict `>`), and the target accuracies there."""
    best = max(history, key=lambda h: (h["eval"][model]["val_mean"], -h["round"]))
    return {"selected_round": best["round"], "selected_on": model,
            "val_mean": best["eval"][model]["val_mean"],
            "acc": best["eval"][model]["target"],
            **{f"acc_{name}": ev["target"] for name, ev in best["eval"].items()}}
