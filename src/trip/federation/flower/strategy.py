"""The Flower strategy of trip: the round protocol of `trip.federation.rounds` over Flower messages.

Per round: the protocol's `participation` names the clients that take part; each gets a train message (to the
node of its domain, which serves all of that domain's clients: the message names the client) with the learning
rate of the schedule; the replies are checked (names, shapes, dtype, finite values of the shared tensors and of
the target upload; a refused or failed client is logged by node id and name and left out) and aggregated by the
protocol's `Server` (the method's weights, client-index order, as in-process); then the deployed server and BMA
models are evaluated on every source client's validation split (one message per node, answered for all its
clients) and on the held-out domain (by the node that holds it, else by the ServerApp through `evaluate_fn`)."""

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
from trip.federation import multidomain
from trip.federation.flower.polling import Backoff
from trip.federation.flower.protocol import SHARED, RunSpec, to_record
from trip.federation.partition import client_names
from trip.federation.rounds import Accepted, Server, eval_record, participation, round_lr, round_record
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
        out[name] = torch.from_numpy(np.array(value)).to(ref.device)
    return out


@dataclass
class TrainReply:
    params: dict[str, torch.Tensor]
    upload: dict[str, torch.Tensor]
    num_examples: int
    loss: float


def check_train_reply(msg: Message, expected: dict[str, torch.Tensor],
                      expected_upload: dict[str, torch.Tensor]) -> TrainReply:
    """The shared tensors, the target upload, num-examples and train loss of a train reply, or UpdateRefused."""
    if msg.has_error():
        raise UpdateRefused(f"the node failed: {msg.error.reason}")
    content = msg.content
    if not {"arrays", "upload"} <= set(content.array_records) or "metrics" not in content.metric_records:
        raise UpdateRefused("the reply lacks its 'arrays', 'upload' or 'metrics' record")
    metrics = content["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n <= 0:
        raise UpdateRefused(f"num-examples {n!r} is not a positive integer")
    return TrainReply(check_update(content["arrays"], expected), check_update(content["upload"], expected_upload),
                      n, float(metrics.get("train-loss", math.nan)))


class TripStrategy(Strategy):
    def __init__(self, method: Method, spec: RunSpec, sources: list[Peer], target_peer: Peer | None,
                 on_round: RoundLogger):
        self.method, self.spec, self.on_round = method, spec, on_round
        self.sources = sorted(sources, key=lambda p: spec.sources.index(p.domain))
        self.node_of = {p.domain: p for p in self.sources}
        self.clients = spec.clients
        self.target_peer = target_peer
        self.peers = {p.node_id: p for p in [*sources, *([target_peer] if target_peer else [])]}
        self.server = Server(method, spec.cfg.train, spec.seed, len(self.clients))
        self._sent: dict[str, tuple[int, int | None]] = {}  # message id -> (destination node, client index)
        self.round_state: dict = {"round": 0, "failed": {}}  # the round in progress: its lr, updates, failures

    @property
    def history(self) -> list[dict]:
        return self.server.history

    @property
    def models(self) -> dict[str, dict[str, torch.Tensor]]:
        """The deployed models of the current round."""
        return self.server.models()

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
        result = Result(arrays=to_record(self.server.params))
        if num_rounds == 0:
            self.round_state = {"round": 0, "failed": {}}
            ev = self._evaluate(grid, 0, evaluate_config, evaluate_fn, timeout)
            failed = self.round_state["failed"]
            self._record({"round": 0, "eval": ev, **({"failed": failed} if failed else {})})
        for server_round in range(self.server.next_round + 1, num_rounds + 1):  # a restored server goes on
            start = time.perf_counter()
            messages = self.configure_train(server_round, result.arrays, train_config or ConfigRecord(), grid)
            result.arrays, metrics = self.aggregate_train(server_round, self.exchange(grid, messages, timeout))
            result.train_metrics_clientapp[server_round] = metrics
            ev = self._evaluate(grid, server_round, evaluate_config, evaluate_fn, timeout)
            state = self.round_state
            self._record(round_record(state["round"], state["lr"], state["taking_part"], state["accepted"],
                                      state["failed"], ev, time.perf_counter() - start))
        return result

    def exchange(self, grid: Grid, messages: Iterable[Message], timeout: float) -> list[Message]:
        """Send; return the replies that came within `timeout` s, as soon as every node has answered."""
        messages = list(messages)
        pending = {i for i in grid.push_messages(messages) if i}
        self._sent.update({m.metadata.message_id: (m.metadata.dst_node_id, self._client_index(m)) for m in messages})
        replies: list[Message] = []
        deadline, wait = time.monotonic() + timeout, Backoff()
        while pending and time.monotonic() < deadline:
            got = list(grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if pending:
                wait.pause()
        for msg_id in pending:
            self._fail(*self._sent[msg_id], f"no reply within {timeout:g} s")
        return replies

    def _evaluate(self, grid: Grid, server_round: int, config: ConfigRecord | None,
                  evaluate_fn: TargetEval | None, timeout: float) -> dict:
        records = self._model_records()
        messages = self.configure_evaluate(server_round, records["server"], config or ConfigRecord(), grid)
        self.aggregate_evaluate(server_round, self.exchange(grid, messages, timeout))
        ev = self.round_state.pop("eval")
        if self.target_peer is None and evaluate_fn is not None:
            for name, record in records.items():
                res = evaluate_fn(server_round, record)
                ev[name]["target"] = float(res["acc"]) if res is not None else math.nan
        return ev

    def _record(self, record: dict) -> None:
        self.server.log(record)
        self.on_round(record)

    # --- the Strategy interface ---------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        r = server_round - 1
        lr = round_lr(self.spec.cfg.train, r)
        taking_part = participation(self.spec.cfg.federation, self.spec.seed, r, len(self.clients))
        self.round_state = {"round": r, "lr": lr, "failed": {}, "accepted": [],
                            "taking_part": taking_part.names(self.clients), "asked": len(taking_part.reporting)}
        online = {p.node_id for p in self._online(grid, self.sources)}
        messages = []
        for i in taking_part.reporting:
            domain, k = self._client_place(i)
            peer = self.node_of.get(domain)
            if peer is None or peer.node_id not in online:
                self._fail(peer.node_id if peer else 0, i, "its node is not connected")
                continue
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(
                {**config, "server-round": server_round, "lr": lr, "client": k})})
            messages.append(self._message(content, peer, MessageType.TRAIN, server_round))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted = []
        for msg in replies:
            node_id, index = self._sent.get(msg.metadata.reply_to_message_id, self._only_client(msg))
            try:
                if index is None:
                    raise UpdateRefused("the reply answers no train message of this round")
                reply = check_train_reply(msg, self.server.params, self.server.uploads[index])
            except UpdateRefused as why:
                self._fail(node_id, index, f"update refused: {why}")
                continue
            accepted.append(Accepted(index, self.clients[index], reply.params, reply.num_examples, reply.loss,
                                     reply.upload))
        required = min(self.spec.min_clients, self.round_state.get("asked", len(self.clients)))
        if len(accepted) < required:
            raise TripError(f"round {server_round - 1}: {len(accepted)} valid client updates, fewer than the "
                            f"{required} required (min-clients); failures: {self.round_state['failed']}")
        self.server.aggregate(server_round - 1, accepted, self.round_state["failed"])
        self.round_state["accepted"] = accepted
        return to_record(self.server.params), MetricRecord({"num-clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """`arrays`: the deployed server model; the BMA one (if any) goes with it, and under multidomain the
        global tensors of each (the nodes build their clients' personalised models from them)."""
        shared = {SHARED.format(m): to_record(p) for m, p in self.server.shared().items()} \
            if self.spec.cfg.protocol == "multidomain" else {}
        content = RecordDict({**self._model_records(), **shared, "server": arrays,
                              "config": ConfigRecord({**config, "server-round": server_round})})
        peers = self._online(grid, [*self.sources, *([self.target_peer] if self.target_peer else [])])
        return [self._message(content, p, MessageType.EVALUATE, server_round) for p in peers]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        acc: dict[str, dict[str, float]] = {}  # client (or the held-out domain) -> model -> accuracy
        tests: dict[str, dict[str, float]] = {}  # multidomain: model -> domain -> in-domain test accuracy
        personal: dict[str, dict[str, float]] = {}  # multidomain: model -> client -> its personalised model's
        for msg in replies:
            node_id, _ = self._sent.get(msg.metadata.reply_to_message_id, (msg.metadata.src_node_id, None))
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                self._fail(node_id, None,
                           f"evaluation failed: {msg.error.reason if msg.has_error() else 'no metrics'}")
                continue
            domain, metrics = self.peers[node_id].domain, msg.content["metrics"]
            names = [domain] if domain == self.spec.target else \
                client_names(domain, self.spec.cfg.federation.clients_per_domain)
            for m in self.models:
                for name, a in zip(names, metrics.get(f"acc-{m}", [math.nan] * len(names)), strict=True):
                    acc.setdefault(name, {})[m] = float(a)
                if f"test-{m}" in metrics:
                    tests.setdefault(m, {})[domain] = float(metrics[f"test-{m}"])
                personal.setdefault(m, {}).update(zip(names, map(float, metrics.get(f"personal-{m}", []))))
        val_clients = [c for c in self.clients if c in acc]
        if not val_clients:
            raise TripError(f"round {server_round - 1}: no source node returned its validation accuracy")
        val = {m: {c: acc[c][m] for c in val_clients} for m in self.models}
        if self.spec.cfg.protocol == "multidomain":
            ev = multidomain.eval_record(
                val, {m: {d: tests.get(m, {}).get(d, math.nan) for d in self.spec.sources} for m in self.models},
                {m: {c: personal[m][c] for c in val_clients if c in personal.get(m, {})} for m in self.models})
        else:
            ev = eval_record(val, {m: a for m, a in acc.get(self.spec.target, {}).items()})
        self.round_state["eval"] = ev
        return MetricRecord({f"val-mean-{m}": ev[m]["val_mean"] for m in ev})

    # --- helpers ----------------------------------------------------------------------------------------

    def _model_records(self) -> dict[str, ArrayRecord]:
        return {m: to_record(params) for m, params in self.models.items()}

    def _message(self, content: RecordDict, peer: Peer, kind: str, server_round: int) -> Message:
        return Message(content, dst_node_id=peer.node_id, message_type=kind, group_id=str(server_round),
                       ttl=self.spec.round_timeout)

    @staticmethod
    def _online(grid: Grid, peers: list[Peer]) -> list[Peer]:
        alive = set(grid.get_node_ids())
        return [p for p in peers if p.node_id in alive]

    def _client_place(self, index: int) -> tuple[str, int]:
        """The domain of the client at `index` and its number there."""
        k = self.spec.cfg.federation.clients_per_domain
        return self.spec.sources[index // k], index % k

    def _client_index(self, msg: Message) -> int | None:
        """The index of the client a train message names (None for other messages)."""
        config = msg.content.config_records.get("config")
        if config is None or "client" not in config:
            return None
        return self.spec.client_index(self.peers[msg.metadata.dst_node_id].domain, int(config["client"]))

    def _only_client(self, msg: Message) -> tuple[int, int | None]:
        """A reply to no message this strategy sent: the sender's client, where its domain has just one."""
        peer = self.peers.get(msg.metadata.src_node_id)
        one = peer is not None and peer.domain in self.node_of and self.spec.cfg.federation.clients_per_domain == 1
        return msg.metadata.src_node_id, self.spec.client_index(peer.domain, 0) if one else None

    def _fail(self, node_id: int, index: int | None, why: str) -> None:
        """`index`: the client the failure is about (None: the node's evaluation)."""
        peer = self.peers.get(node_id)
        who = self.clients[index] if index is not None else peer.domain if peer else "unknown domain"
        log(WARNING, "round %s: node %d (%s) left out: %s", self.round_state.get("round", 0), node_id, who, why)
        self.round_state["failed"].setdefault(who, why)

