"""Secure aggregation (Flower's SecAgg+): the aggregate equals plain weighted FedAvg of the same client updates
within the documented quantization bound (and is not bit-equal: it was quantized); nothing the server side
receives in the train exchange is, or approximates, one node's update; a SuperNode failing at the masked-vector
stage is survived in a real Flower federation; what cannot work is refused."""

from __future__ import annotations

import copy
import sys
from uuid import uuid4

import numpy as np
import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from trip.config import parse_config
from trip.errors import TripError
from trip.experiment import prepare, run_experiment
from trip.federation import secure
from trip.federation.client import client_update
from trip.federation.flower import client_app, node
from trip.federation.flower.engine import FlowerRuns
from trip.federation.flower.local import LocalFederation, trip_worker
from trip.federation.flower.protocol import RunSpec, to_record
from trip.federation.flower.strategy import Peer, TripStrategy
from trip.federation.rounds import round_lr, round_seed
from trip.federation.server import fedavg

pytestmark = pytest.mark.flower

SEED, TARGET, K = 3, "photo", 2
SECAGG = {"max_weight": 40.0}
CONFIG = {
    "name": "secagg-test", "seeds": [SEED], "device": "cpu",
    "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 4, "targets": [TARGET]},
    "train": {"rounds": 1, "batch_size": 8, "lr": 0.002},
    "methods": [{"name": "promptfl", "n_ctx": 2}],
    "federation": {"clients_per_domain": K, "min_client_size": 4, "secure_aggregation": True, "secagg": SECAGG},
}


def config(**federation) -> dict:
    return {**CONFIG, "federation": {**CONFIG["federation"], **federation}}


@pytest.fixture(scope="module")
def workspace():
    return prepare(parse_config(CONFIG))


@pytest.fixture(scope="module")
def in_one_process(workspace):
    """The ServerApp and every node's ClientApp in this process: messages built here (the workflow's) take their
    run from the task identity a ServerApp process has, and the nodes share the test's workspace (a process
    keeps one, and each node would otherwise rebuild its own for every message)."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
            mp.setattr(TaskIdentity, name, value)
        mp.setattr(node, "workspace", lambda *_: workspace)
        yield


@pytest.fixture(scope="module")
def secure_run(workspace, in_one_process) -> tuple[TripStrategy, LoopbackGrid]:
    return secure_round(workspace.cfg, workspace)


class LoopbackGrid(Grid):
    """Hands each message, copied as over the wire, to the real ClientApp of its node in this process, and keeps
    every reply the server side receives."""

    def __init__(self, spec: RunSpec):
        self.contexts = {10 + i: Context(run_id=1, node_id=10 + i, node_config={"partition-id": i}, state=RecordDict(),
                                         run_config=spec.run_config()) for i in range(len(spec.sources))}
        self.replies: dict[str, Message] = {}
        self.received: list[Message] = []

    def set_run(self, run) -> None:
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            delivered = copy.deepcopy(msg)
            try:
                reply = client_app.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as ex:  # noqa: BLE001 - as trip's worker: the failure goes back as an Error reply
                reply = Message(Error(code=0, reason=f"{type(ex).__name__}: {ex}"), reply_to=delivered)
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        got = [self.replies.pop(i) for i in list(message_ids) if i in self.replies]
        self.received += got
        return got

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def secure_round(cfg, workspace) -> tuple[TripStrategy, LoopbackGrid]:
    spec = RunSpec(cfg, SEED, cfg.methods[0].label or cfg.methods[0].name, TARGET, round_timeout=60.0)
    method = workspace.methods[0]
    grid = LoopbackGrid(spec)
    strategy = TripStrategy(method, spec, [Peer(10 + i, d, tuple(range(cfg.federation.clients_per_domain)))
                                              for i, d in enumerate(spec.sources)], None,
                            on_round=lambda _: None)
    strategy.start(grid, to_record(method.init_params(SEED)), num_rounds=1, timeout=60.0)
    return strategy, grid


def plain_updates(cfg, workspace) -> list[tuple[dict, int]]:
    """Each client's update of round 0 and its weight, trained in this process as the nodes train them."""
    method, clients = workspace.methods[0], workspace.clients(TARGET, SEED)
    init = method.init_params(SEED)
    return [(client_update(method, init, c.train, cfg.train, round_lr(cfg.train, 0), round_seed(SEED, 0, i),
                           private=method.init_private(SEED, i, len(clients))).params, c.weight)
            for i, c in enumerate(clients)]


def test_the_secure_aggregate_is_plain_fedavg_within_the_bound_and_quantized(workspace, secure_run):
    cfg = workspace.cfg
    strategy, _ = secure_run
    updates = plain_updates(cfg, workspace)
    plain = fedavg([u for u, _ in updates], [w for _, w in updates])
    node_weights = [sum(w for _, w in updates[d * K:(d + 1) * K]) for d in range(len(updates) // K)]
    max_abs = max(float(t.abs().max()) for u, _ in updates for t in u.values())
    bound = secure.aggregation_bound(node_weights, max_abs, cfg.federation.secagg, clients=len(updates))
    diff = max(float((strategy.server.params[k] - plain[k]).abs().max()) for k in plain)
    assert 0 < diff <= bound < 1e-3 * max_abs, (diff, bound)
    [record] = strategy.history
    assert record["participants"] == [c.name for c in workspace.clients(TARGET, SEED)]
    assert record["secure_aggregation"] == {"nodes": RunSpec(cfg, SEED, "promptfl", TARGET).sources,
                                            "dropped_nodes": [], "shares": 3, "threshold": 2}


def test_the_server_side_never_receives_an_update_only_their_sum(workspace, secure_run):
    cfg = workspace.cfg
    strategy, grid = secure_run
    sa = cfg.federation.secagg
    updates = plain_updates(cfg, workspace)
    nodes = [fedavg([u for u, _ in updates[d * K:(d + 1) * K]], [w for _, w in updates[d * K:(d + 1) * K]])
             for d in range(len(updates) // K)]
    weights = [sum(w for _, w in updates[d * K:(d + 1) * K]) for d in range(len(nodes))]
    flat = [torch.cat([n[k].flatten() for k in n]).double().numpy() for n in nodes]
    prescaled = [f * secure.quantized_ratio(w, sa) for f, w in zip(flat, weights, strict=True)]
    quantized = [(p + sa.clipping_range) * sa.quantization_range / (2 * sa.clipping_range) for p in prescaled]
    seen = []  # every array in every reply of the train exchange: masked vectors, keys, shares as numbers
    for msg in grid.received:
        if msg.has_error() or RECORD_KEY_CONFIGS not in msg.content.config_records:
            continue
        seen += [np.asarray(a.numpy(), np.float64).ravel() for rec in msg.content.array_records.values()
                 for a in rec.values()]
        masked = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.MASKED_PARAMETERS, [])
        seen.append(np.concatenate([bytes_to_ndarray(b).ravel() for b in masked[1:]]).astype(np.float64)
                    if masked else np.zeros(0))
    vectors = [v for v in seen if v.size == flat[0].size]
    assert len(vectors) == len(nodes)  # one masked vector per node, and no other array of an update's size
    for v in vectors:
        for candidate in [*flat, *prescaled, *quantized]:
            assert np.abs(v - candidate).mean() > 1e3 * sa.quantization_range / 2**22, "an update reached the server"
    plain = torch.cat([v.flatten() for v in fedavg([u for u, _ in updates], [w for _, w in updates]).values()])
    assert torch.allclose(torch.cat([v.flatten() for v in strategy.server.params.values()]), plain, atol=1e-4)


def test_a_prescaled_value_beyond_the_clipping_range_is_refused(workspace, in_one_process):
    cfg = parse_config(config(secagg={**SECAGG, "clipping_range": 1e-4}))
    with pytest.raises(TripError, match="beyond federation.secagg.clipping_range"):
        secure_round(cfg, workspace)


def test_what_cannot_be_securely_aggregated_is_refused(workspace, tmp_path):
    with pytest.raises(TripError, match="needs a Flower engine"):
        run_experiment(parse_config(CONFIG), tmp_path / "a")
    ensemble = {"name": "fedotp", "n_ctx": 2, "target_mode": "source_ensemble"}
    with pytest.raises(TripError, match="target mode that needs no per-client upload"):
        run_experiment(parse_config({**CONFIG, "methods": [ensemble]}), tmp_path / "b", engine="flower")
    with pytest.raises(TripError, match="SuperNode cartoon weighs .* set max_weight to at least"):  # photo: held out
        run_experiment(parse_config(config(secagg={"max_weight": 5.0})), tmp_path / "c", engine="flower")
    for bad, why in [({"num_shares": 2}, "at least 3"), ({"reconstruction_threshold": 3}, "num_shares - 1"),
                     ({"modulus_range": 3000}, "power of 2")]:
        with pytest.raises(TripError, match=why):
            parse_config(config(secagg=bad))


# --- a real Flower federation in which one SuperNode fails at the masked-vector stage ---------------------------

# SuperNode 2's worker: trip's, but its ClientApp fails every masked-vector stage (after setup and key sharing).
FAILING_WORKER = """
import sys
from trip.federation.flower import client_app, worker

def fail(msg, context):
    raise RuntimeError("this SuperNode fails at the masked-vector stage (test)")

client_app.train_securely = fail
worker.serve(sys.argv[1])
"""


def test_a_supernode_failing_at_the_masked_vector_stage_is_survived(workspace, tmp_path):
    cfg = workspace.cfg
    sources = RunSpec(cfg, SEED, "promptfl", TARGET).sources

    def worker(i: int, api: str) -> list[str]:
        return [sys.executable, "-c", FAILING_WORKER, api] if i == 2 else trip_worker(i, api)

    with LocalFederation([f"partition-id={i} num-partitions=3" for i in range(3)], tmp_path / "logs",
                         worker=worker) as fed:
        got = FlowerRuns(fed, cfg, tmp_path)(workspace.methods[0], TARGET, SEED, lambda _: None)
    [record] = got.history
    assert record["secure_aggregation"] == {"nodes": sources[:2], "dropped_nodes": sources[2:], "shares": 3,
                                            "threshold": 2}
    stayed = [c.name for c in workspace.clients(TARGET, SEED)[:2 * K]]
    assert record["participants"] == stayed
    for k in range(K):
        why = record["failed"][f"{sources[2]}/{k}"]
        assert "collect_masked_vectors stage" in why and "masked-vector stage (test)" in why
    updates = plain_updates(cfg, workspace)[:2 * K]
    plain = fedavg([u for u, _ in updates], [w for _, w in updates])
    max_abs = max(float(t.abs().max()) for u, _ in updates for t in u.values())
    bound = secure.aggregation_bound([sum(w for _, w in updates[:K]), sum(w for _, w in updates[K:])], max_abs,
                                     cfg.federation.secagg, clients=2 * K)
    diff = max(float((got.models["server"][k] - plain[k]).abs().max()) for k in plain)
    assert 0 < diff <= bound, (diff, bound)
