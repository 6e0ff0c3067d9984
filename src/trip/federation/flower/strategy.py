"""The Flower strategy of trip: the round protocol of `trip.federation.rounds` over Flower messages.

Per round: the protocol's `participation` names the clients that take part; each gets a train message (to the
node that serves it, the one of its domain under `--engine flower`, its own under `flower-sim`: the message names
the client) with the learning rate of the schedule; the replies are checked (names, shapes, dtype, finite values
of the shared tensors and of the target upload; a refused or failed client is logged by node id and name and left
out) and aggregated by the protocol's `Server` (the method's weights, client-index order, as in-process; under
federation.dp inside Flower's DP wrapper, which clips the updates and noises the average: `dp.py`); then the
deployed server and BMA models are evaluated on every source client's validation split (one message per node,
answered for each client it serves) and on the held-out domain (by the node that holds it, else by the ServerApp
through `evaluate_fn`).

With `federation.secure_aggregation` the train exchange is Flower's SecAgg+ instead (`train_securely`): one
message per node naming its clients, and only the weighted mean of the nodes' updates reaches this side."""

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
from trip.federation.flower.dp import dp_train_step
from trip.federation.flower.polling import Backoff
from trip.federation.flower.protocol import SHARED, RunSpec, accuracy_key, from_record, to_record
from trip.federation.flower.secagg import SecureSum, secure_sum
from trip.federation.partition import client_domain
from trip.federation.privacy import round_privacy
from trip.federation.rounds import (
    Accepted,
    Report,
    Server,
    eval_record,
    participation,
    round_lr,
    round_record,
    sample_size,
)
from trip.methods.base import Method

RoundLogger = Callable[[dict], None]
TargetEval = Callable[[int, ArrayRecord], MetricRecord | None]


@dataclass(frozen=True)
class Peer:
    node_id: int
    domain: str
    clients: tuple[int, ...] = ()  # the numbers, within the domain, of the clients it serves (none: the target's)


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
    """The shared tensors, the target upload, num-examples and train loss of a train reply, or UpdateRefused.
    A method that uploads nothing sends no 'upload' record (so that the reply has the one ArrayRecord that
    Flower's clipping mod takes)."""
    if msg.has_error():
        raise UpdateRefused(f"the node failed: {msg.error.reason}")
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise UpdateRefused("the reply lacks its 'arrays' or 'metrics' record")
    metrics = content["metrics"]
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n <= 0:
        raise UpdateRefused(f"num-examples {n!r} is not a positive integer")
    upload = content.array_records.get("upload", ArrayRecord())
    return TrainReply(check_update(content["arrays"], expected), check_update(upload, expected_upload),
                      n, float(metrics.get("train-loss", math.nan)))


class TripStrategy(Strategy):
    def __init__(self, method: Method, spec: RunSpec, sources: list[Peer], target_peer: Peer | None,
                 on_round: RoundLogger):
        self.method, self.spec, self.on_round = method, spec, on_round
        self.sources = sorted(sources, key=lambda p: (spec.sources.index(p.domain), p.clients))
        self.node_of = {spec.client_index(p.domain, k): p for p in self.sources for k in p.clients}
        self.clients = spec.clients
        self.target_peer = target_peer
        self.peers = {p.node_id: p for p in [*sources, *([target_peer] if target_peer else [])]}
        self.server = Server(method, spec.cfg.train, spec.seed, len(self.clients))
        self._sent: dict[str, tuple[int, int | None]] = {}  # message id -> (destination node, client index)
        self.round_state: dict = {"round": 0, "failed": {}}  # the round in progress: its lr, updates, failures
        dp = spec.cfg.federation.dp
        # The strategy whose configure_train and aggregate_train run a round's training: this one, or Flower's
        # differential-privacy wrapper around it.
        self.train_step: Strategy = dp_train_step(self, dp, self._sampled) if dp else self

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
            self._name_the_unvalidated(failed, ev)
            self._record({"round": 0, "eval": ev, **({"failed": failed} if failed else {})})
        for server_round in range(self.server.next_round + 1, num_rounds + 1):  # a restored server goes on
            start = time.perf_counter()
            if self.spec.cfg.federation.secure_aggregation:
                result.arrays, metrics = self.train_securely(grid, server_round, result.arrays,
                                                             train_config or ConfigRecord(), timeout)
            else:
                messages = self.train_step.configure_train(server_round, result.arrays,
                                                           train_config or ConfigRecord(), grid)
                replies = self.screen(self.exchange(grid, messages, timeout))
                result.arrays, metrics = self.train_step.aggregate_train(server_round, replies)
                self.server.commit(server_round - 1, from_record(result.arrays, self.method.backbone.device))
            result.train_metrics_clientapp[server_round] = metrics
            ev = self._evaluate(grid, server_round, evaluate_config, evaluate_fn, timeout)
            state = self.round_state
            self._name_the_missing(state, ev)
            record = round_record(state["round"], state["lr"], state["taking_part"], state["accepted"],
                                  state["failed"], ev, time.perf_counter() - start)
            self._record(record | state.get("secure", {}) | self._privacy(state["accepted"]))
        return result

    def screen(self, replies: list[Message]) -> list[Message]:
        """The replies that aggregate_train accepts; the others are logged as failed here, before a DP wrapper
        sees them (Flower's clips before trip could check a reply, and skips a round with any failed one)."""
        return [msg for msg in replies if self._accept(msg) is not None]

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
        val, target, parts, in_domain = self.round_state.pop("eval")
        if in_domain is not None:  # multidomain: the nodes tested their own domains
            return in_domain
        if self.target_peer is None and evaluate_fn is not None:
            for name, record in records.items():
                res = evaluate_fn(server_round, record)
                target[name] = {p: float(res[accuracy_key("", p)]) for p in parts} if res is not None else {}
        return eval_record(val, target)

    def _name_the_missing(self, state: dict, ev: dict) -> None:
        """Every client the round asked to train without an accepted update, and every source client without a
        validation accuracy, is under "failed" (whatever path lost it): a round record never hides a loss
        (`trip.lost_clients`)."""
        accepted = {a.name for a in state["accepted"]}
        for name in state["taking_part"]["sampled"]:
            if name not in accepted and name not in state["taking_part"]["dropped"]:
                state["failed"].setdefault(name, "asked to train, sent no accepted update")
        self._name_the_unvalidated(state["failed"], ev)

    def _name_the_unvalidated(self, failed: dict[str, str], ev: dict) -> None:
        for name in self.clients:
            if any(name not in model["val"] for model in ev.values()):
                failed.setdefault(name, failed.get(client_domain(name), "no validation accuracy"))

    def _record(self, record: dict) -> None:
        self.server.log(record)
        self.on_round(record)

    # --- the Strategy interface ---------------------------------------------------------------------

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        lr, plan = self._plan_train(server_round, grid)
        messages = []
        for peer, clients in plan.items():
            for i in clients:
                content = RecordDict({"arrays": arrays, "config": ConfigRecord(
                    {**config, "server-round": server_round, "lr": lr, "client": self._client_number(i)})})
                messages.append(self._message(content, peer, MessageType.TRAIN, server_round))
        return messages

    def _plan_train(self, server_round: int, grid: Grid) -> tuple[float, dict[Peer, list[int]]]:
        """Opens the round: its lr and, per connected source node, the indices of the clients it trains (a
        client whose node is not connected is failed)."""
        r = server_round - 1
        lr = round_lr(self.spec.cfg.train, r)
        taking_part = participation(self.spec.cfg.federation, self.spec.seed, r, len(self.clients))
        self.round_state = {"round": r, "lr": lr, "failed": {}, "accepted": [],
                            "taking_part": taking_part.names(self.clients), "asked": len(taking_part.reporting)}
        online = {p.node_id for p in self._online(grid, self.sources)}
        plan: dict[Peer, list[int]] = {}
        for i in taking_part.reporting:
            peer = self.node_of.get(i)
            if peer is None or peer.node_id not in online:
                self._fail(peer.node_id if peer else 0, i, "its node is not connected")
                continue
            plan.setdefault(peer, []).append(i)
        return lr, plan

    def train_securely(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       timeout: float) -> tuple[ArrayRecord, MetricRecord]:
        """The train exchange through SecAgg+ (`secagg.secure_sum`): one message per node naming its clients;
        the server gets the weighted mean of the updates of the nodes that stayed, never one node's update."""
        lr, plan = self._plan_train(server_round, grid)
        r = server_round - 1
        work = {peer.node_id: {**config, "server-round": server_round, "lr": lr, "names": ",".join(arrays),
                               "clients": ",".join(str(self._client_number(i)) for i in clients)}
                for peer, clients in plan.items()}
        if len(work) == 1:  # a sum of one is that node's update
            [(peer, clients)] = plan.items()
            for i in clients:
                self._fail(peer.node_id, i, "secure aggregation needs the updates of at least 2 SuperNodes; "
                                            "only this one takes part in the round")
        result = secure_sum(grid, self.spec.cfg.federation.secagg, timeout, server_round, arrays, work) \
            if len(work) > 1 else SecureSum(None)
        reports = []
        for peer, clients in plan.items():
            metrics = result.reports.get(peer.node_id) if result.mean is not None else None
            for i in clients:
                if metrics is not None:
                    loss = metrics.get(f"loss-{self._client_number(i)}", math.nan)
                    reports.append(Report(i, self.clients[i], float(loss)))
                elif len(work) > 1:
                    self._fail(peer.node_id, i, result.dropped.get(peer.node_id) or
                               f"secure aggregation halted in its {result.halted}")
        self._require(server_round, reports)
        self.server.aggregate_from_sum(r, result.mean, self.round_state["failed"])
        inside = {p for p in plan if p.node_id in result.reports}
        self.round_state |= {"accepted": reports, "secure": {"secure_aggregation": {
            "nodes": [p.domain for p in plan if p in inside],
            "dropped_nodes": [p.domain for p in plan if p not in inside],
            "shares": result.shares, "threshold": result.threshold}}}
        return to_record(self.server.params), MetricRecord({"num-clients": len(reports)})

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The method's average of the valid replies, which the caller commits (`start`: after a DP wrapper has
        noised it)."""
        accepted = [a for msg in replies if (a := self._accept(msg)) is not None]
        self._require(server_round, accepted)
        average = self.server.average(server_round - 1, accepted, self.round_state["failed"])
        self.round_state["accepted"] = accepted
        return to_record(average), MetricRecord({"num-clients": len(accepted)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """`arrays`: the deployed server model; the BMA one (if any) goes with it, and under multidomain the
        global tensors of each (the nodes build their clients' personalised models from them)."""
        shared = {SHARED.format(m): to_record(p) for m, p in self.server.shared().items()} \
            if self.spec.cfg.protocol == "multidomain" else {}
        content = RecordDict({**self._model_records(), **shared, "server": arrays,
                              "config": ConfigRecord({**config, "server-round": server_round})})
        peers = [*self.sources, *([self.target_peer] if self.target_peer else [])]
        online = self._online(grid, peers)
        for p in peers:
            if p not in online:
                self._fail(p.node_id, None, "evaluation: its node is not connected")
        return [self._message(content, p, MessageType.EVALUATE, server_round) for p in online]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        acc: dict[str, dict[str, dict[str, float]]] = {}  # client (or the held-out domain) -> model -> part -> accuracy
        parts = [""]
        tests: dict[str, dict[str, float]] = {}  # multidomain: model -> domain -> in-domain test accuracy
        personal: dict[str, dict[str, float]] = {}  # multidomain: model -> client -> its personalised model's
        for msg in replies:
            node_id, _ = self._sent.get(msg.metadata.reply_to_message_id, (msg.metadata.src_node_id, None))
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                self._fail(node_id, None,
                           f"evaluation failed: {msg.error.reason if msg.has_error() else 'no metrics'}")
                continue
            domain, metrics = self.peers[node_id].domain, msg.content["metrics"]
            names = [domain] if domain == self.spec.target else [self._client_name(domain, k)
                                                                 for k in self.peers[node_id].clients]
            if "parts" in msg.content.config_records:
                parts = [str(p) for p in msg.content["parts"]["names"]]
            for m in self.models:
                for p in parts:
                    for name, a in zip(names, metrics.get(accuracy_key(m, p), [math.nan] * len(names)), strict=True):
                        acc.setdefault(name, {}).setdefault(m, {})[p] = float(a)
                if f"test-{m}" in metrics:
                    tests.setdefault(m, {})[domain] = float(metrics[f"test-{m}"])
                personal.setdefault(m, {}).update(zip(names, map(float, metrics.get(f"personal-{m}", []))))
        val_clients = [c for c in self.clients if c in acc]
        if not val_clients:
            raise TripError(f"round {server_round - 1}: no source node returned its validation accuracy")
        val = {m: {c: acc[c][m] for c in val_clients} for m in self.models}
        target = dict(acc.get(self.spec.target, {}))
        in_domain = multidomain.eval_record(
            {m: {c: a[""] for c, a in v.items()} for m, v in val.items()},
            {m: {d: tests.get(m, {}).get(d, math.nan) for d in self.spec.sources} for m in self.models},
            {m: {c: personal[m][c] for c in val_clients if c in personal.get(m, {})} for m in self.models},
        ) if self.spec.cfg.protocol == "multidomain" else None
        self.round_state["eval"] = (val, target, parts, in_domain)
        ev = in_domain or eval_record(val, target)
        return MetricRecord({f"val-mean-{m}": ev[m]["val_mean"] for m in ev})

    # --- helpers ----------------------------------------------------------------------------------------

    def _require(self, server_round: int, updates: list) -> None:
        required = min(self.spec.min_clients, self.round_state.get("asked", len(self.clients)))
        if len(updates) < required:
            raise TripError(f"round {server_round - 1}: {len(updates)} valid client updates, fewer than the "
                            f"{required} required (min-clients); failures: {self.round_state['failed']}")

    def _accept(self, msg: Message) -> Accepted | None:
        """The update of a train reply; None (the failure logged) if it is refused."""
        node_id, index = self._sent.get(msg.metadata.reply_to_message_id, self._only_client(msg))
        try:
            if index is None:
                raise UpdateRefused("the reply answers no train message of this round")
            reply = check_train_reply(msg, self.server.params, self.server.uploads[index])
        except UpdateRefused as why:
            self._fail(node_id, index, f"update refused: {why}")
            return None
        return Accepted(index, self.clients[index], reply.params, reply.num_examples, reply.loss, reply.upload)

    @property
    def _sampled(self) -> int:
        return sample_size(self.spec.cfg.federation, len(self.clients))

    def _privacy(self, accepted: list[Accepted]) -> dict:
        """The round record's "dp" entry, under federation.dp."""
        dp = self.spec.cfg.federation.dp
        if dp is None:
            return {}
        rate = self._sampled / len(self.clients)
        return {"dp": round_privacy(dp, self.history, rate, self.server.weights(accepted), self._sampled)}

    def _model_records(self) -> dict[str, ArrayRecord]:
        return {m: to_record(params) for m, params in self.models.items()}

    def _message(self, content: RecordDict, peer: Peer, kind: str, server_round: int) -> Message:
        return Message(content, dst_node_id=peer.node_id, message_type=kind, group_id=str(server_round),
                       ttl=self.spec.round_timeout)

    @staticmethod
    def _online(grid: Grid, peers: list[Peer]) -> list[Peer]:
        alive = set(grid.get_node_ids())
        return [p for p in peers if p.node_id in alive]

    def _client_number(self, index: int) -> int:
        """The number, within its domain, of the client at `index`."""
        return index % self.spec.cfg.federation.clients_per_domain

    def _client_name(self, domain: str, k: int) -> str:
        return self.clients[self.spec.client_index(domain, k)]

    def _client_index(self, msg: Message) -> int | None:
        """The index of the client a train message names (None for other messages)."""
        config = msg.content.config_records.get("config")
        if config is None or "client" not in config:
            return None
        return self.spec.client_index(self.peers[msg.metadata.dst_node_id].domain, int(config["client"]))

    def _only_client(self, msg: Message) -> tuple[int, int | None]:
        """A reply to no message this strategy sent: the sender's client, where it serves just one."""
        peer = self.peers.get(msg.metadata.src_node_id)
        one = peer is not None and peer.domain != self.spec.target and len(peer.clients) == 1
        return msg.metadata.src_node_id, self.spec.client_index(peer.domain, peer.clients[0]) if one else None

    def _fail(self, node_id: int, index: int | None, why: str) -> None:
        """`index`: the client the failure is about (None: the node's evaluation)."""
        peer = self.peers.get(node_id)
        who = self.clients[index] if index is not None else peer.domain if peer else "unknown domain"
        log(WARNING, "round %s: node %d (%s) left out: %s", self.round_state.get("round", 0), node_id, who, why)
        self.round_state["failed"].setdefault(who, why)

