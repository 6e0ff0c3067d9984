"""The Flower strategy of trip: the rounds of the in-process engine over Flower messages.

Per round: the learning rate of the schedule goes to every source node in the train ConfigRecord; the
replies are checked (names, shapes, dtype, finite values; a refused or failed node is logged by id and domain
and left out), sorted by client index and averaged with `fedavg` (so the sum runs in the in-process order);
the BMA is updated; then the server and BMA models are evaluated on every source's validation split and on
the held-out domain (by the node that holds it, else by the ServerApp through `evaluate_fn`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from trip.errors import TripError
from trip.federation.flower.polling import Backoff
from trip.federation.flower.protocol import MODELS, RunSpec, from_record, to_record
from trip.federation.server import BMA, fedavg
from trip.methods.base import Method

RoundLogger = Callable[[dict], None]
TargetEval = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class Peer:
    node_id: int
    domain: str


class UpdateRefused(Exception):
    """A client update the server does not aggregate; the message says why."""


def check_update(arrays: ArrayRecord, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The update's tensors if they have exactly the expected names, shapes and dtype (float32) and only
    finite values; else UpdateRefused."""
    if set(arrays) != set(expected):
        raise UpdateRefused(f"tensor names {sorted(arrays)} differ from the expected {sorted(expected)}")
    out = {}
    for name, ref in expected.items():
        try:
            value = arrays[name].numpy()
        except (TypeError, ValueError) as err:
            raise UpdateRefused(f"'{name}' is not a readable array ({err})") from None
        if value.dtype != np.float32:
            raise UpdateRefused(f"'{name}' has dtype {value.dtype}, expected float32")
        if tuple(value.shape) != tuple(ref.shape):
            raise UpdateRefused(f"'{name}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        bad = int((~np.isfinite(value)).sum())
        if bad:
            raise UpdateRefused(f"'{name}' has {bad} non-finite values")
        out[name] = torch.from_numpy(np.array(value))
    return out


def check_train_reply(msg: Message, expected: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, float]:
    """(tensors, num-examples, train loss) of a train reply, or UpdateRefused."""
    if msg.has_error():
        raise UpdateRefused(f"the node failed: {msg.error.reason}")
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise UpdateRefused("the reply lacks its 'arrays' or 'metrics' record")
    metrics = content["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n <= 0:
        raise UpdateRefused(f"num-examples {n!r} is not a positive integer")
    return check_update(content["arrays"], expected), n, float(metrics.get("train-loss", math.nan))


class TripStrategy(Strategy):
    def __init__(self, method: Method, spec: RunSpec, sources: list[Peer], target_peer: Peer | None,
                 on_round: RoundLogger):
        self.method, self.spec, self.on_round = method, spec, on_round
        self.index = {p.node_id: spec.sources.index(p.domain) for p in sources}
        self.sources = sorted(sources, key=lambda p: self.index[p.node_id])
        self.target_peer = target_peer
        self.peers = {p.node_id: p for p in [*sources, *([target_peer] if target_peer else [])]}
        self.history: list[dict] = []
        self.params: dict[str, torch.Tensor] = {}
        self.bma: BMA | None = None
        self._sent: dict[str, int] = {}  # message id -> destination node
        self.round_state: dict = {"round": 0, "failed": {}}  # the record of the round in progress

    @property
    def models(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"server": self.params} if self.bma is None else {"server": self.params, "bma": self.bma.params}

    def summary(self) -> None:
        log(INFO, "TripStrategy: method %s, held out %s, seed %d, sources %s (nodes %s), target on %s, "
            "min clients %d", self.spec.method, self.spec.target, self.spec.seed, self.spec.sources,
            [p.node_id for p in self.sources], self.target_peer.node_id if self.target_peer else "the server",
            self.spec.min_clients)

    # --- the round ------------------------------------------------------------------------------------

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: TargetEval | None = None) -> Result:
        """`num_rounds` = 0 evaluates the initial model once (an untrained method, as round 0 in-process)."""
        self.summary()
        self.params = from_record(initial_arrays)
        cfg = self.method.cfg
        if self.method.uses_bma and num_rounds:
            self.bma = BMA(self.params, num_rounds, cfg.bma_beta, cfg.bma_include_init)
        result = Result(arrays=initial_arrays)
        if num_rounds == 0:
            self.round_state = {"round": 0, "failed": {}}
            ev = self._evaluate(grid, 0, evaluate_config, evaluate_fn, timeout)
            failed = self.round_state["failed"]
            self._record({"round": 0, "eval": ev, **({"failed": failed} if failed else {})})
        for server_round in range(1, num_rounds + 1):
            start = time.perf_counter()
            messages = self.configure_train(server_round, result.arrays, train_config or ConfigRecord(), grid)
            result.arrays, metrics = self.aggregate_train(server_round, self.exchange(grid, messages, timeout))
            result.train_metrics_clientapp[server_round] = metrics
            ev = self._evaluate(grid, server_round, evaluate_config, evaluate_fn, timeout)
            keys = ("round", "lr", "train_loss", "participants", "failed")  # the in-process engine's record
            self._record({**{k: self.round_state[k] for k in keys}, "eval": ev, "time_s": time.perf_counter() - start})
        return result

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Send; return the replies that came within `timeout` s, as soon as every node has answered."""
        messages = list(messages)
        pending = {i for i in grid.push_messages(messages) if i}
        self._sent.update({m.metadata.message_id: m.metadata.dst_node_id for m in messages})
        replies: list[Message] = []
        deadline, wait = time.monotonic() + timeout, Backoff()
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                wait.pause()
        for msg_id in pending:
            self._fail(self._sent[msg_id], f"no reply within {timeout:g} s")
        return replies

    def _evaluate(self, grid: Grid, server_round: int, config: ConfigRecord | None,
                  evaluate_fn: TargetEval | None, timeout: float) -> dict:
        arrays = to_record(self.params)
        messages = self.configure_evaluate(server_round, arrays, config or ConfigRecord(), grid)
        self.aggregate_evaluate(server_round, self.exchange(grid, messages, timeout))
        ev = self.round_state.pop("eval")
        if self.target_peer is None and evaluate_fn is not None:
            for name, record in self._model_records(arrays).items():
                res = evaluate_fn(server_round, record)
                ev[name]["target"] = float(res["acc"]) if res is not None else math.nan
        return ev

    def _record(self, record: dict) -> None:
        self.history.append(record)
        self.on_round(record)

    # --- the Strategy interface ---------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1
        train = self.spec.cfg.train
        lr = train.lr * train.lr_decay**r
        self.round_state = {"round": r, "lr": lr, "failed": {}}
        content = RecordDict({"arrays": arrays,
                              "config": ConfigRecord({**config, "server-round": server_round, "lr": lr})})
        return [self._message(content, p, MessageType.TRAIN, server_round) for p in self._online(grid, self.sources)]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            node_id = self._sender(msg)
            try:
                if node_id not in self.index:
                    raise UpdateRefused("the node holds no source domain of this run")
                params, n, loss = check_train_reply(msg, self.params)
            except UpdateRefused as why:
                self._fail(node_id, f"update refused: {why}")
                continue
            accepted.append((self.index[node_id], self.peers[node_id].domain, params, n, loss))
        accepted.sort(key=lambda a: a[0])
        if len(accepted) < self.spec.min_clients:
            raise TripError(f"round {server_round - 1}: {len(accepted)} valid client updates, fewer than the "
                            f"{self.spec.min_clients} required (min-clients); failures: "
                            f"{self.round_state['failed']}")
        self.params = fedavg([a[2] for a in accepted], [a[3] for a in accepted])
        if self.bma is not None:
            self.bma.update(self.params, server_round - 1)
        self.round_state.update(train_loss={a[1]: a[4] for a in accepted}, participants=[a[1] for a in accepted])
        return to_record(self.params), MetricRecord({"num-clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        content = RecordDict({**self._model_records(arrays),
                              "config": ConfigRecord({**config, "server-round": server_round})})
        peers = self._online(grid, [*self.sources, *([self.target_peer] if self.target_peer else [])])
        return [self._message(content, p, MessageType.EVALUATE, server_round) for p in peers]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        acc: dict[str, dict[str, float]] = {}  # domain -> model -> accuracy
        for msg in replies:
            node_id = self._sender(msg)
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                self._fail(node_id, f"evaluation failed: {msg.error.reason if msg.has_error() else 'no metrics'}")
                continue
            metrics = msg.content["metrics"]
            acc[self.peers[node_id].domain] = {m: float(metrics.get(f"acc-{m}", math.nan)) for m in self.models}
        val_domains = [p.domain for p in self.sources if p.domain in acc]
        if not val_domains:
            raise TripError(f"round {server_round - 1}: no source node returned its validation accuracy")
        ev = {}
        for m in self.models:
            val = {d: acc[d][m] for d in val_domains}
            ev[m] = {"val": val, "val_mean": sum(val.values()) / len(val),
                     "target": acc.get(self.spec.target, {}).get(m, math.nan)}
        self.round_state["eval"] = ev
        return MetricRecord({f"val-mean-{m}": ev[m]["val_mean"] for m in ev})

    # --- helpers ----------------------------------------------------------------------------------------

    def _model_records(self, server: ArrayRecord) -> dict[str, ArrayRecord]:
        return {m: server if m == "server" else to_record(self.models[m]) for m in MODELS if m in self.models}

    def _message(self, content: RecordDict, peer: Peer, kind: str, server_round: int) -> Message:
        return Message(content, dst_node_id=peer.node_id, message_type=kind, group_id=str(server_round),
                       ttl=self.spec.round_timeout)

    @staticmethod
    def _online(grid: Grid, peers: list[Peer]) -> list[Peer]:
        alive = set(grid.get_node_ids())
        return [p for p in peers if p.node_id in alive]

    def _sender(self, msg: Message) -> int:
        """The node a reply is about (the SuperLink itself answers for a node that went offline)."""
        return self._sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _fail(self, node_id: int, why: str) -> None:
        peer = self.peers.get(node_id)
        domain = peer.domain if peer else "unknown domain"
        log(WARNING, "round %s: node %d (%s) left out: %s", self.round_state.get("round", 0), node_id, domain, why)
        self.round_state["failed"].setdefault(domain, why)
