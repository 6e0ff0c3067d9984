"""The Flower strategy of trip: the round protocol of `trip.federation.rounds` over Flower messages.

Per round: the learning rate of the schedule goes to every source node in the train ConfigRecord; the
replies are checked (names, shapes, dtype, finite values of the shared tensors and of the target upload; a
refused or failed node is logged by id and domain and left out) and aggregated by the protocol's `Server` (the
method's weights, client-index order, as in-process); then the deployed server and BMA models are evaluated on
every source's validation split and on the held-out domain (by the node that holds it, else by the ServerApp
through `evaluate_fn`)."""

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
from trip.federation.flower.protocol import RunSpec, to_record
from trip.federation.rounds import Accepted, Server, eval_record, round_lr, round_record
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
        self.index = {p.node_id: spec.sources.index(p.domain) for p in sources}
        self.sources = sorted(sources, key=lambda p: self.index[p.node_id])
        self.target_peer = target_peer
        self.peers = {p.node_id: p for p in [*sources, *([target_peer] if target_peer else [])]}
        self.server = Server(method, spec.cfg.train, spec.seed, len(spec.sources))
        self._sent: dict[str, int] = {}  # message id -> destination node
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
        for server_round in range(1, num_rounds + 1):
            start = time.perf_counter()
            messages = self.configure_train(server_round, result.arrays, train_config or ConfigRecord(), grid)
            result.arrays, metrics = self.aggregate_train(server_round, self.exchange(grid, messages, timeout))
            result.train_metrics_clientapp[server_round] = metrics
            ev = self._evaluate(grid, server_round, evaluate_config, evaluate_fn, timeout)
            state = self.round_state
            self._record(round_record(state["round"], state["lr"], state["accepted"], state["failed"], ev,
                                      time.perf_counter() - start))
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
        self.round_state = {"round": r, "lr": lr, "failed": {}, "accepted": []}
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
                index = self.index[node_id]
                reply = check_train_reply(msg, self.server.params, self.server.uploads[index])
            except UpdateRefused as why:
                self._fail(node_id, f"update refused: {why}")
                continue
            accepted.append(Accepted(index, self.peers[node_id].domain, reply.params, reply.num_examples,
                                     reply.loss, reply.upload))
        if len(accepted) < self.spec.min_clients:
            raise TripError(f"round {server_round - 1}: {len(accepted)} valid client updates, fewer than the "
                            f"{self.spec.min_clients} required (min-clients); failures: "
                            f"{self.round_state['failed']}")
        self.server.aggregate(server_round - 1, accepted, self.round_state["failed"])
        self.round_state["accepted"] = accepted
        return to_record(self.server.params), MetricRecord({"num-clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """`arrays`: the deployed server model; the BMA one (if any) goes with it."""
        content = RecordDict({**self._model_records(), "server": arrays,
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
        ev = eval_record({m: {d: acc[d][m] for d in val_domains} for m in self.models},
                         {m: a for m, a in acc.get(self.spec.target, {}).items()})
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

    def _sender(self, msg: Message) -> int:
        """The node a reply is about (the SuperLink itself answers for a node that went offline)."""
        return self._sent.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)

    def _fail(self, node_id: int, why: str) -> None:
        peer = self.peers.get(node_id)
        domain = peer.domain if peer else "unknown domain"
        log(WARNING, "round %s: node %d (%s) left out: %s", self.round_state.get("round", 0), node_id, domain, why)
        self.round_state["failed"].setdefault(domain, why)
