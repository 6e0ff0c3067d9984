"""The ServerApp: one Flower run = one (seed, method, held-out domain) of an experiment.

It finds which SuperNode holds which domain (a `query` message), runs the rounds with TripStrategy, selects
the round as the in-process engine does, and writes rounds.jsonl, result.json and models.safetensors to the
run config's `out-dir` (on the SuperLink's machine). With a `checkpoint-dir` it writes the in-process engine's
per-round checkpoint there (server and BMA tensors, the clients' latest uploads, the history; never a private
tensor) and continues a run from the latest one."""

from __future__ import annotations

import time
from logging import DEBUG, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from trip.checkpoint import RunCheckpoints
from trip.errors import TripError
from trip.federation import multidomain, secure
from trip.federation.flower import node
from trip.federation.flower.protocol import (
    STOPPING,
    RunSpec,
    accuracy_key,
    from_record,
    quiet_root_logger,
    to_record,
)
from trip.federation.flower.strategy import Peer, TripStrategy
from trip.federation.privacy import check_method
from trip.federation.rounds import part_accuracies, select_round, selection_model
from trip.results import strict_json

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    quiet_root_logger()
    spec = RunSpec.from_run_config(context.run_config)
    start = time.perf_counter()
    sources, target_peer = discover(grid, spec)
    ws = node.workspace(spec.cfg, [] if target_peer else [spec.target])
    method = node.method_of(ws, spec.method)
    if spec.cfg.federation.secure_aggregation:
        secure.check(spec.cfg.federation, [method], {})
    check_method(method, spec.cfg)
    out = Path(spec.out_dir) if spec.out_dir else None
    checkpoints = RunCheckpoints(Path(spec.checkpoint_dir)) if spec.checkpoint_dir and method.trainable else None
    state = checkpoints.latest() if checkpoints else None

    def on_round(record: dict) -> None:
        if out and (out / STOPPING).exists():  # its clients may be going: the round may have run without them
            raise TripError(f"trip is stopping the federation: round {record['round']} is neither logged nor "
                            f"checkpointed")
        _log_round(record, out)
        if checkpoints:
            checkpoints.save(strategy.server.state([]))

    strategy = TripStrategy(method, spec, sources, target_peer, on_round=on_round)
    if state:
        strategy.server.restore(state, [])
        log(INFO, "resuming from the checkpoint of round %d in %s", state.next_round - 1, spec.checkpoint_dir)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "rounds.jsonl").write_text("".join(strict_json(r) + "\n" for r in strategy.history))

    in_domain = spec.cfg.protocol == "multidomain"  # the nodes test their own domains; nothing is held out
    target_split = ws.target(spec.target) if not (target_peer or in_domain) else None

    def evaluate_target(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = from_record(arrays, ws.backbone.device)
        return MetricRecord({accuracy_key("", part): acc
                             for part, acc in part_accuracies(method, params, target_split).items()})

    rounds = spec.cfg.train.rounds if method.trainable else 0
    strategy.start(grid, to_record(method.init_params(spec.seed)), num_rounds=rounds, timeout=spec.round_timeout,
                   evaluate_fn=None if in_domain else evaluate_target)
    chosen = (multidomain.select if in_domain else select_round)(strategy.history, selection_model(method))
    log(INFO, "selected round %d: target accuracy %.2f", chosen["selected_round"], chosen["acc"])
    if out:
        _write_result(out, strategy, chosen, time.perf_counter() - start)


def discover(grid: Grid, spec: RunSpec) -> tuple[list[Peer], Peer | None]:
    """Ask each connected SuperNode which domain it holds and which of its clients it serves, until every source
    client has a node or connect-timeout has passed; a node holding the held-out domain evaluates it."""
    peers: dict[int, Peer | None] = {}
    deadline = time.monotonic() + spec.connect_timeout
    while True:
        new = [n for n in grid.get_node_ids() if n not in peers]
        if new:
            peers.update(_query(grid, new, spec.round_timeout))
        served = {spec.client_index(p.domain, k) for p in peers.values() if p and p.domain in spec.sources
                  for k in p.clients}
        missing = [c for i, c in enumerate(spec.clients) if i not in served]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    sources = [p for p in peers.values() if p and p.domain in spec.sources]
    _check_served_once(sources, spec)
    if len(served) < spec.min_clients:
        raise TripError(f"after {spec.connect_timeout:g} s, SuperNodes serve {len(served)} of the run's "
                        f"{len(spec.clients)} source clients, missing {_some(missing)}; {spec.min_clients} "
                        f"clients are required (min-clients)")
    targets = [p for p in peers.values() if p and p.domain == spec.target]
    return sources, targets[0] if targets else None


def _check_served_once(sources: list[Peer], spec: RunSpec) -> None:
    nodes: dict[str, list[int]] = {}
    for p in sources:
        for k in p.clients:
            nodes.setdefault(spec.clients[spec.client_index(p.domain, k)], []).append(p.node_id)
    twice = {c: ids for c, ids in nodes.items() if len(ids) > 1}
    if twice:
        raise TripError(f"several SuperNodes serve the same clients ({_some(list(twice.items()))}): start one "
                        f"SuperNode per domain")


def _some(items: list, shown: int = 5) -> str:
    return ", ".join(map(str, items[:shown])) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _query(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, Peer | None]:
    """node -> what it holds (None: it failed; its error is logged)."""
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY,
                        group_id="query", ttl=timeout) for n in node_ids]
    pending = {i for i in grid.push_messages(messages) if i}
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    out: dict[int, Peer | None] = dict.fromkeys(node_ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            node_id = sent[reply.metadata.reply_to_message_id]
            if reply.has_error():
                log(WARNING, "node %d cannot take part: %s", node_id, reply.error.reason)
            else:
                held = reply.content["node"]
                out[node_id] = Peer(node_id, str(held["domain"]), tuple(int(k) for k in held.get("clients", [])))
                log(DEBUG, "node %d holds %s, clients %s", node_id, out[node_id].domain, out[node_id].clients)
        if pending:
            time.sleep(0.25)
    for msg_id in pending:
        log(WARNING, "node %d did not say which domain it holds within %g s", sent[msg_id], timeout)
    return out


def _log_round(record: dict, out: Path | None) -> None:
    ev = record["eval"]["bma" if "bma" in record["eval"] else "server"]
    log(INFO, "round %d: participants %s, val %.2f, target %.2f", record["round"],
        record.get("participants", "-"), ev["val_mean"], ev["target"])
    if out:
        with (out / "rounds.jsonl").open("a") as f:
            f.write(strict_json(record) + "\n")


def _write_result(out: Path, strategy: TripStrategy, chosen: dict, seconds: float) -> None:
    models = strategy.models
    save_file({f"{model}/{k}": v.contiguous() for model, params in models.items() for k, v in params.items()},
              out / "models.safetensors", metadata={"models": ",".join(models)})
    doc = {"selected": chosen, "rounds": len(strategy.history), "clients": strategy.spec.sources,
           "comm_params_per_round": strategy.method.comm_params,
           "comm_upload_once_params": strategy.method.upload_params, "time_s": round(seconds, 2)}
    tmp = out / "result.json.tmp"
    tmp.write_text(strict_json(doc, indent=2))
    tmp.replace(out / "result.json")
