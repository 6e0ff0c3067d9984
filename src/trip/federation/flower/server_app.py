"""The ServerApp: one Flower run = one (seed, method, held-out domain) of an experiment.

It finds which SuperNode holds which domain (a `query` message), runs the rounds with TripStrategy, selects
the round as the in-process engine does, and writes rounds.jsonl, result.json and models.safetensors to the
run config's `out-dir` (on the SuperLink's machine). With a `checkpoint-dir` it writes the in-process engine's
per-round checkpoint there (server and BMA tensors, the clients' latest uploads, the history; never a private
tensor) and continues a run from the latest one."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from trip.checkpoint import RunCheckpoints
from trip.errors import TripError
from trip.federation import multidomain
from trip.federation.client import accuracy
from trip.federation.flower import node
from trip.federation.flower.protocol import RunSpec, from_record, quiet_root_logger, to_record
from trip.federation.flower.strategy import Peer, TripStrategy
from trip.federation.rounds import select_round, selection_model
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
    out = Path(spec.out_dir) if spec.out_dir else None
    checkpoints = RunCheckpoints(Path(spec.checkpoint_dir)) if spec.checkpoint_dir and method.trainable else None
    state = checkpoints.latest() if checkpoints else None

    def on_round(record: dict) -> None:
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

    def evaluate_target(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        params = from_record(arrays, ws.backbone.device)
        return MetricRecord({"acc": accuracy(method, params, ws.target(spec.target))})

    rounds = spec.cfg.train.rounds if method.trainable else 0
    in_domain = spec.cfg.protocol == "multidomain"  # the nodes test their own domains; nothing is held out
    strategy.start(grid, to_record(method.init_params(spec.seed)), num_rounds=rounds, timeout=spec.round_timeout,
                   evaluate_fn=None if in_domain else evaluate_target)
    chosen = (multidomain.select if in_domain else select_round)(strategy.history, selection_model(method))
    log(INFO, "selected round %d: target accuracy %.2f", chosen["selected_round"], chosen["acc"])
    if out:
        _write_result(out, strategy, chosen, time.perf_counter() - start)


def discover(grid: Grid, spec: RunSpec) -> tuple[list[Peer], Peer | None]:
    """Ask each connected SuperNode which domain it holds, until every source domain has one or
    connect-timeout has passed; a node holding the held-out domain evaluates it."""
    domains: dict[int, str | None] = {}
    deadline = time.monotonic() + spec.connect_timeout
    while True:
        new = [n for n in grid.get_node_ids() if n not in domains]
        if new:
            domains.update(_query(grid, new, spec.round_timeout))
        missing = [d for d in spec.sources if d not in domains.values()]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    by_domain: dict[str, list[int]] = {}
    for node_id, domain in domains.items():
        if domain is not None:
            by_domain.setdefault(domain, []).append(node_id)
    twice = {d: ids for d, ids in by_domain.items() if len(ids) > 1}
    if twice:
        raise TripError(f"several SuperNodes hold the same domain {twice}: start one SuperNode per domain")
    sources = [Peer(ids[0], d) for d, ids in by_domain.items() if d in spec.sources]
    held = len(sources) * spec.cfg.federation.clients_per_domain
    if held < spec.min_clients:
        raise TripError(f"after {spec.connect_timeout:g} s, SuperNodes hold {len(sources)} of the source domains "
                        f"{spec.sources} ({held} clients), missing {missing}; {spec.min_clients} clients are "
                        f"required (min-clients)")
    target = by_domain.get(spec.target)
    return sources, Peer(target[0], spec.target) if target else None


def _query(grid: Grid, node_ids: list[int], timeout: float) -> dict[int, str | None]:
    """node -> the domain it holds (None: it failed; its error is logged)."""
    messages = [Message(RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY,
                        group_id="query", ttl=timeout) for n in node_ids]
    pending = {i for i in grid.push_messages(messages) if i}
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    out: dict[int, str | None] = dict.fromkeys(node_ids)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for reply in grid.pull_messages(pending):
            pending.discard(reply.metadata.reply_to_message_id)
            node_id = sent[reply.metadata.reply_to_message_id]
            if reply.has_error():
                log(WARNING, "node %d cannot take part: %s", node_id, reply.error.reason)
            else:
                out[node_id] = str(reply.content["node"]["domain"])
                log(INFO, "node %d holds %s", node_id, out[node_id])
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
