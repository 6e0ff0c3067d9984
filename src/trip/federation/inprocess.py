"""The in-process engine: one machine, the round's clients in turn, as `trip.federation.rounds` says.
It keeps each client's private tensors between rounds and in its checkpoints."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from trip.checkpoint import FederationState
from trip.config import FederationCfg, TrainCfg
from trip.federation import multidomain
from trip.federation.client import NonFiniteError, client_update
from trip.federation.rounds import Accepted, Client, Server, evaluate, participation, round_lr, round_record, round_seed
from trip.methods.base import Method, Split, Tensors

RoundLogger = Callable[[dict], None]


@dataclass
class FederationResult:
    history: list[dict]  # one record per round (round 0 alone for an untrained method)
    models: dict[str, dict]  # the final deployed "server" (and "bma") models


def run_federation(method: Method, clients: list[Client], target: Split | dict[str, Split], train: TrainCfg, seed: int,
                   log: RoundLogger, *, federation: FederationCfg | None = None, resume: FederationState | None = None,
                   on_round: Callable[[FederationState], None] | None = None) -> FederationResult:
    """All rounds, or those after `resume`; `on_round` gets the state after each (for checkpoints). `target`: the
    held-out domain, or (multidomain) each domain's in-domain test split."""
    server = Server(method, train, seed, len(clients))
    privates = [method.init_private(seed, i, len(clients)) for i in range(len(clients))]
    if not method.trainable:
        record = {"round": 0, "eval": _evaluate(method, server, clients, privates, target)}
        log(record)
        return FederationResult([record], server.models())
    if resume is not None:
        privates = resume.privates or privates  # a checkpoint of a method without private state may hold none
        server.restore(resume, privates)
    federation = federation or FederationCfg()
    for r in range(server.next_round, train.rounds):
        start = time.perf_counter()
        lr = round_lr(train, r)
        accepted, failed = [], {}
        taking_part = participation(federation, seed, r, len(clients))
        for i in taking_part.reporting:
            c = clients[i]
            try:
                u = client_update(method, server.params, c.train, train, lr, round_seed(seed, r, i),
                                  private=privates[i], where=f"client {c.name}, round {r}")
            except NonFiniteError as err:
                print(f"warning: {err}", file=sys.stderr)
                failed[c.name] = str(err)
                continue
            privates[i] = u.private
            accepted.append(Accepted(i, c.name, u.params, c.weight, u.loss, method.target_upload(u.private)))
        server.aggregate(r, accepted, failed)
        ev = _evaluate(method, server, clients, privates, target)
        record = round_record(r, lr, taking_part.names([c.name for c in clients]), accepted, failed, ev,
                              time.perf_counter() - start)
        server.log(record)
        log(record)
        if on_round is not None:
            on_round(server.state(privates))
    return FederationResult(server.history, server.models())


def _evaluate(method: Method, server: Server, clients: list[Client], privates: list[Tensors],
              target: Split | dict[str, Split]) -> dict:
    if isinstance(target, dict):
        return multidomain.evaluate(method, server, clients, privates, target)
    return evaluate(method, server.models(), clients, target)
