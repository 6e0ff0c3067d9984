"""trip on Flower: real SuperLink and SuperNode processes on 127.0.0.1 give the numbers of the in-process engine,
also over TLS with SuperNode authentication; a SuperNode that dies in round 2 leaves a completed run with the
reduced participation recorded; a client update with NaNs is refused and its node named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.common.config import parse_config_args
from patience import PATIENCE_S

from trip.cli import main
from trip.config import parse_config
from trip.experiment import prepare
from trip.federation.flower import client_app
from trip.federation.flower.certs import node_keys
from trip.federation.flower.engine import FlowerRuns
from trip.federation.flower.local import LocalFederation, Tls, descendants, free_port, supernode_command
from trip.federation.flower.protocol import RunSpec, from_record, to_record, write_run_config
from trip.federation.flower.strategy import Peer, TripStrategy, UpdateRefused, check_update
from trip.federation.inprocess import run_federation
from trip.federation.rounds import select_round
from trip.federation.server import fedavg
from trip.lost_clients import lost_clients

pytestmark = pytest.mark.flower

SEED, TARGET = 3, "photo"
CONFIG = {
    "name": "flower-test", "seeds": [SEED], "device": "cpu",
    "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 4, "targets": [TARGET]},
    "train": {"rounds": 2, "batch_size": 8, "lr": 0.002},
    "methods": [{"name": "trip", "num_experts": 2, "n_ctx": 2, "kmeans_iters": 5}],
}
PARTITIONS = [f"partition-id={i} num-partitions=3" for i in range(3)]


@pytest.fixture(scope="module")
def cfg():
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def workspace(cfg):
    """Also warms the frozen-feature cache that every process of the federations reads."""
    return prepare(cfg)


@pytest.fixture(scope="module")
def reference(cfg, workspace):
    """The in-process engine's run."""
    ws = workspace
    return run_federation(ws.methods[0], ws.clients(TARGET, SEED), ws.target(TARGET), cfg.train, SEED, lambda _: None)


def without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in record.items() if k != "time_s"} for record in history]


# --- the message protocol and the strategy, without processes ----------------------------------------------

def test_trip_flower_run_config_survives_the_flwr_toml_parser(cfg, tmp_path):
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(CONFIG))
    assert main(["flower", "run-config", str(tmp_path / "exp.yaml"), "--target", TARGET, "--min-clients", "2",
                 "--out-dir", str(tmp_path), "-o", str(tmp_path / "run.toml")]) == 0
    parsed = parse_config_args([str(tmp_path / "run.toml")])
    assert RunSpec.from_run_config(parsed) == RunSpec(cfg, SEED, "trip", TARGET, out_dir=str(tmp_path), min_clients=2)


def test_check_update_refuses_wrong_names_shapes_dtypes_and_non_finite_values():
    expected = {"experts": torch.zeros(2, 3)}
    ok = np.ones((2, 3), np.float32)
    assert torch.equal(check_update(ArrayRecord({"experts": Array(ok)}), expected)["experts"], torch.ones(2, 3))
    bad = {"names": {"router": Array(ok)}, "shape": {"experts": Array(np.ones((3, 2), np.float32))},
           "dtype": {"experts": Array(ok.astype(np.float64))},
           "non-finite": {"experts": Array(np.array([[1, np.inf, 1], [1, 1, np.nan]], np.float32))}}
    for why, arrays in bad.items():
        with pytest.raises(UpdateRefused, match=why):
            check_update(ArrayRecord(arrays), expected)


def test_update_with_nans_is_refused_named_and_the_rest_aggregated(cfg, workspace, caplog):
    """Two ClientApps called directly with a train message, and node 12 replying with NaNs."""
    spec = RunSpec(cfg, SEED, "trip", TARGET, min_clients=2)
    method = workspace.methods[0]
    init = method.init_params(SEED)
    content = RecordDict({"arrays": to_record(init), "config": ConfigRecord({"server-round": 1, "lr": 0.002})})
    replies = [client_app.app(train_message(content, 10 + pid),
                              Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid},
                                      state=RecordDict(), run_config=spec.run_config()))
               for pid in range(2)]
    good = [from_record(r.content["arrays"]) for r in replies]
    sizes = [r.content["metrics"]["num-examples"] for r in replies]
    assert sizes == [len(workspace.domains[d]) for d in spec.sources[:2]]  # the images a node holds
    nans = ArrayRecord({"experts": Array(np.full(tuple(init["experts"].shape), np.nan, np.float32))})
    replies.append(Message(RecordDict({"arrays": nans, "metrics": replies[0].content["metrics"]}),
                           reply_to=train_message(content, 12)))

    strategy = TripStrategy(method, spec, [Peer(10 + i, d, (0,)) for i, d in enumerate(spec.sources)], None,
                            on_round=lambda _: None)
    strategy.server.params = init
    with caplog.at_level("WARNING", logger="flwr"):
        arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.equal(from_record(arrays)["experts"], fedavg(good, sizes)["experts"])
    assert [a.name for a in strategy.round_state["accepted"]] == spec.sources[:2]
    assert "non-finite" in strategy.round_state["failed"][spec.sources[2]]
    assert f"node 12 ({spec.sources[2]}) left out" in caplog.text


def train_message(content: RecordDict, node_id: int) -> Message:
    """A train message as the SuperNode hands it to the ClientApp (built outside a ServerApp process)."""
    return Message(content, metadata=Metadata(run_id=1, message_id=f"train-{node_id}", src_node_id=0,
                                              dst_node_id=node_id, reply_to_message_id="", group_id="1",
                                              created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN))


# --- a local federation: `trip run --engine flower` -----------------------------------------------------------

def test_trip_run_engine_flower_writes_the_in_process_run_folder(cfg, reference, tmp_path):
    """The run folder of `trip run --engine flower` holds the in-process engine's rounds and selection."""
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    assert main(["run", str(config), "--engine", "flower", "--out", str(tmp_path / "out")]) == 0
    key = {"method": "trip", "target": TARGET, "seed": SEED}
    rounds = [json.loads(line) for line in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert without_time(rounds) == without_time([{**key, **record} for record in reference.history])
    [run] = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert run.items() >= {**key, **select_round(reference.history, "bma"), "rounds": 2,
                           "clients": RunSpec(cfg, SEED, "trip", TARGET).sources}.items()
    assert "| trip |" in (tmp_path / "out" / "summary.md").read_text()
    assert sorted(p.name for p in (tmp_path / "out" / "flower" / "logs").iterdir()) == \
        ["serverapp-worker.log", "superlink.log", *[f"supernode{i}.log" for i in range(3)],
         *[f"worker{i}.log" for i in range(3)], "workers.log"]


# --- TLS, SuperNode authentication, a node that dies -----------------------------------------------------------

# SuperNode 2's worker: serves its tasks like trip's, but on the 4th task of an armed run (query, train and
# evaluate of round 1, then the train message of round 2) it stops its SuperNode and never replies.
DYING_WORKER = """
import os, signal, sys, time
from pathlib import Path
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType
import trip.federation.flower.client_app
from trip.federation.flower.worker import run_clientapp_task, runtime_client

api, armed = sys.argv[1], Path(sys.argv[2])
client, seen = runtime_client(api, None), {}
while True:
    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    if not (res.HasField("task") and res.token):
        time.sleep(0.2)
        continue
    run = res.task.run_id
    seen[run] = seen.get(run, 0) + 1
    if seen[run] == 4 and armed.is_file() and str(run) in armed.read_text().split():
        for proc in Path("/proc").iterdir():
            cmd = (proc / "cmdline").read_bytes() if proc.name.isdigit() else b""
            if b"flower-supernode" in cmd and b"--port\\0" + api.rsplit(":", 1)[1].encode() in cmd:
                os.kill(int(proc.name), signal.SIGTERM)
        time.sleep(3600)
    run_clientapp_task(api, None, res.token)
"""


@pytest.fixture(scope="module")
def tls_federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flower-tls")
    assert main(["flower", "certs", str(folder / "certs"), "--nodes", "3"]) == 0
    armed = folder / "armed-runs.txt"

    def worker(i: int, api: str) -> list[str] | None:
        return [sys.executable, "-c", DYING_WORKER, api, str(armed)] if i == 2 else None  # 0, 1: forked

    with LocalFederation(PARTITIONS, folder / "logs", Tls.from_dir(folder / "certs", 3), worker) as fed:
        fed.armed = armed
        yield fed


def test_tls_and_node_auth_federation_matches_in_process(cfg, workspace, reference, tls_federation, tmp_path):
    assert "--enable-supernode-auth" in tls_federation.superlink[0].args
    assert json.loads(tls_federation.flwr("supernode", "list", "trip-local", "--format", "json"))["nodes"]
    got = FlowerRuns(tls_federation, cfg, tmp_path)(workspace.methods[0], TARGET, SEED, lambda _: None)
    assert without_time(got.history) == without_time(reference.history)
    assert got.models.keys() == reference.models.keys() == {"server", "bma"}
    for model, params in reference.models.items():
        assert torch.equal(got.models[model]["experts"], params["experts"]), model


def test_supernode_with_an_unregistered_key_is_refused(tls_federation, tmp_path):
    key = node_keys(tmp_path / "stranger.key")[0]
    cmd = supernode_command(tls_federation.address, free_port(), PARTITIONS[0], (tls_federation.tls.ca, key))
    res = subprocess.run([*cmd, "--max-retries", "0"], env=tls_federation.env, capture_output=True, text=True,
                         timeout=PATIENCE_S)
    assert res.returncode != 0 and "Failed to activate SuperNode" in res.stdout + res.stderr, res.stderr[-2000:]


def test_node_dying_in_round_two_leaves_a_completed_run_with_fewer_participants(cfg, workspace, reference,
                                                                                tls_federation, tmp_path,
                                                                                monkeypatch):
    submit = tls_federation.submit

    def submit_armed(run_config: Path, clients: int) -> int:
        run_id = submit(run_config, clients)
        tls_federation.armed.write_text(f"{run_id}\n")
        return run_id

    monkeypatch.setattr(tls_federation, "submit", submit_armed)
    got = FlowerRuns(tls_federation, cfg, tmp_path, min_clients=2)(workspace.methods[0], TARGET, SEED,
                                                                    lambda _: None)
    dead = reference.history[0]["participants"][2]
    assert got.history[0]["participants"] == reference.history[0]["participants"]
    assert without_time(got.history[:1]) == without_time(reference.history[:1])
    assert got.history[1]["participants"] == reference.history[1]["participants"][:2]
    assert "Node Unavailable" in got.history[1]["failed"][dead]
    assert dead not in got.history[1]["eval"]["bma"]["val"]
    assert [list(lost_clients(r)) for r in got.history] == [[], [dead]]  # what summary.md and trip report name


def test_trip_flower_wait_exits_non_zero_for_a_failed_run(cfg, tls_federation, tmp_path, monkeypatch, capsys):
    """`flwr run` exits 0 whatever becomes of the run; `trip flower wait` does not. Here no SuperNode holds PACS
    data: they refuse the run, and the ServerApp ends it after its connect timeout."""
    pacs = cfg.model_copy(update={"data": cfg.data.model_copy(update={"name": "pacs", "targets": ["sketch"]})})
    spec = RunSpec(pacs, SEED, "trip", "sketch", out_dir=str(tmp_path), connect_timeout=1.0, round_timeout=30.0)
    run_id = tls_federation.submit(write_run_config(spec, tmp_path / "run.toml"))
    monkeypatch.setenv("FLWR_HOME", str(tls_federation.home))
    assert main(["flower", "wait", str(run_id), "trip-local", "--poll", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"Flower run {run_id} ended finished:failed" in err
    assert "SuperNodes serve 0 of the run's 3 source clients" in err
    assert f"flwr log {run_id} trip-local --show" in err


def test_stopping_the_federation_stops_every_process(tls_federation):
    """Last in the module: the federation's teardown finds nothing left to stop."""
    procs = [*tls_federation.superlink, *(p for pair in tls_federation.nodes for p in pair)]
    deadline = time.monotonic() + PATIENCE_S  # run alone, the workers may still be importing
    while "forked worker1" not in (tls_federation.logs / "workers.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    tree = [pid for p in procs for pid in [p.pid, *descendants(p.pid)]]
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree if _running(pid)}
    assert {"trip-serverapp", "trip-worker0", "trip-worker1"} <= names  # forked workers (worker 2 is the test's)
    tls_federation.stop()
    assert all(p.poll() is not None for p in procs)
    assert not [pid for pid in tree if _running(pid)]
    assert not tls_federation.home.exists()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
