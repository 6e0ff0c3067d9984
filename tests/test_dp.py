"""federation.dp: the config, the accountant against dp-accounting, the refusals, Flower's clipping on real client
updates (client and server side), and real Flower federations: noise 0 with an infinite clipping norm gives the
plain run's numbers bit for bit; noise > 0 reports an epsilon that grows with the rounds."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from test_flower import CONFIG as FLOWER_CONFIG  # tests/ is on sys.path
from test_flower import PARTITIONS, SEED, TARGET

from trip.config import load_config, parse_config
from trip.errors import TripError
from trip.experiment import prepare, run_experiment
from trip.federation.flower import client_app
from trip.federation.flower.dp import ServerSideClipping
from trip.federation.flower.engine import FlowerRuns
from trip.federation.flower.local import LocalFederation
from trip.federation.flower.protocol import RunSpec, from_record, to_record
from trip.federation.flower.strategy import Peer, TripStrategy
from trip.federation.inprocess import run_federation
from trip.federation.privacy import check_method, effective_noise_multiplier, epsilon, round_privacy
from trip.federation.rounds import select_round
from trip.federation.server import fedavg
from trip.results import privacy_lines

CONFIG = {**FLOWER_CONFIG, "name": "dp-test"}  # the Flower tests' tiny TRIP federation


def with_dp(**dp) -> dict:
    return {**CONFIG, "federation": {"dp": dp}}


@pytest.fixture(scope="module")
def cfg():
    return parse_config(CONFIG)


@pytest.fixture(scope="module")
def workspace(cfg):
    return prepare(cfg)


# --- config and accounting --------------------------------------------------------------------------------

@pytest.mark.parametrize("dp, key", [
    ({"mode": "both", "clipping_norm": 1, "noise_multiplier": 1}, "federation.dp.mode"),
    ({"mode": "client", "clipping_norm": 0, "noise_multiplier": 1}, "federation.dp.clipping_norm"),
    ({"mode": "client", "clipping_norm": 1, "noise_multiplier": -1}, "federation.dp.noise_multiplier"),
    ({"mode": "client", "clipping_norm": 1, "noise_multiplier": math.inf}, "federation.dp.noise_multiplier"),
    ({"mode": "client", "clipping_norm": 1, "noise_multiplier": 1, "delta": 1}, "federation.dp.delta"),
    ({"mode": "client", "noise_multiplier": 1}, "federation.dp.clipping_norm"),
    ({"mode": "client", "clipping_norm": math.inf, "noise_multiplier": 1}, "infinite clipping_norm bounds no"),
])
def test_bad_dp_config_is_refused_naming_the_key(dp, key):
    with pytest.raises(TripError, match=key):
        parse_config(with_dp(**dp))


def test_an_infinite_clipping_norm_survives_yaml_and_the_flower_run_config(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("methods: [{name: promptfl}]\nfederation:\n  dp: {mode: server, clipping_norm: .inf, "
                    "noise_multiplier: 0}\n")
    cfg = load_config(path)
    assert cfg.federation.dp.clipping_norm == math.inf
    spec = RunSpec(cfg, SEED, "promptfl", "photo")
    assert RunSpec.from_run_config(spec.run_config()).cfg == cfg


def test_epsilon_is_dp_accountings_rdp_epsilon_of_the_subsampled_gaussian():
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(0.25, dp_accounting.GaussianDpEvent(1.1)), 5)
    assert epsilon([(0.25, 1.1)] * 5, 1e-5) == accountant.get_epsilon(1e-5)
    # Without sampling, 10 releases at noise multiplier 1: the plain Gaussian mechanism composed 10 times.
    assert epsilon([(1.0, 1.0)] * 10, 1e-5) == pytest.approx(19.0536, abs=1e-4)


def test_epsilon_grows_with_the_rounds_and_is_infinite_without_noise():
    eps = [epsilon([(0.5, 1.0)] * r, 1e-5) for r in range(6)]
    assert eps[0] == 0 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert epsilon([(1.0, 0.0)], 1e-5) == math.inf


def test_effective_noise_multiplier_is_the_configured_one_for_equal_weights_and_full_replies():
    assert effective_noise_multiplier(1.2, [1, 1, 1], 3) == pytest.approx(1.2)
    assert effective_noise_multiplier(1.2, [1, 1], 3) == pytest.approx(0.8)  # a drop: noise for 3, mean of 2
    assert effective_noise_multiplier(1.2, [10, 20, 30], 3) == pytest.approx(1.2 * 60 / 90)  # weighted


def test_round_privacy_composes_the_earlier_rounds():
    dp = parse_config(with_dp(mode="server", clipping_norm=1.0, noise_multiplier=1.0)).federation.dp
    first = round_privacy(dp, [], 1.0, [5, 5], 2)
    second = round_privacy(dp, [{"round": 0, "dp": first}], 1.0, [5, 5], 2)
    assert first["epsilon"] == epsilon([(1.0, 1.0)], 1e-5) < second["epsilon"] == epsilon([(1.0, 1.0)] * 2, 1e-5)
    assert round_privacy(dp, [{"round": 0, "dp": first}], 1.0, [], 2)["epsilon"] == first["epsilon"]  # no release


def test_summary_reports_each_runs_last_epsilon(tmp_path):
    cfg = parse_config(with_dp(mode="client", clipping_norm=1.0, noise_multiplier=1.0))
    key = {"method": "trip", "target": TARGET, "seed": SEED}
    records = [{**key, "round": 0, "dp": {"epsilon": 1.5}}, {**key, "round": 1, "dp": {"epsilon": 2.25}},
               {**key, "target": "sketch", "round": 0, "dp": {"epsilon": None}}]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    runs = [key, {**key, "target": "sketch"}, {**key, "target": "cartoon"}]
    lines = "\n".join(privacy_lines(tmp_path, cfg, runs))
    assert f"| trip | {TARGET} | {SEED} | 2.25 |" in lines and f"| trip | sketch | {SEED} | ∞ |" in lines
    assert f"| trip | cartoon | {SEED} | — |" in lines


# --- refusals ------------------------------------------------------------------------------------------------

def test_in_process_engine_refuses_dp_naming_the_flower_engine(tmp_path):
    cfg = parse_config(with_dp(mode="server", clipping_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(TripError, match="--engine flower"):
        run_experiment(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_method_that_uploads_private_tensors_is_refused_under_dp():
    cfg = parse_config(with_dp(mode="server", clipping_norm=1.0, noise_multiplier=1.0))
    with pytest.raises(TripError, match="fedotp uploads 8 parameters"):
        check_method(SimpleNamespace(label="fedotp", upload_params=8), cfg)
    check_method(SimpleNamespace(label="trip", upload_params=0), cfg)
    check_method(SimpleNamespace(label="fedotp", upload_params=8), parse_config(CONFIG))


# --- clipping on real updates --------------------------------------------------------------------------------

def train_replies(spec: RunSpec, init: dict, config: dict, nodes: int = 2) -> list[Message]:
    """The ClientApps of the first source domains, called as a SuperNode calls them."""
    content = RecordDict({"arrays": to_record(init), "config": ConfigRecord({"server-round": 1, "lr": 0.002,
                                                                              **config})})
    return [client_app.app(train_message(content, 10 + pid),
                           Context(run_id=1, node_id=10 + pid, node_config={"partition-id": pid},
                                   state=RecordDict(), run_config=spec.run_config()))
            for pid in range(nodes)]


def train_message(content: RecordDict, node_id: int) -> Message:
    return Message(content, metadata=Metadata(run_id=1, message_id=f"train-{node_id}", src_node_id=0,
                                              dst_node_id=node_id, reply_to_message_id="", group_id="1",
                                              created_at=time.time(), ttl=600.0, message_type=MessageType.TRAIN))


def update_of(reply: Message, init: dict) -> torch.Tensor:
    return torch.cat([(v - init[k]).flatten() for k, v in from_record(reply.content["arrays"]).items()])


@pytest.fixture(scope="module")
def plain(cfg, workspace):
    """The initial tensors and two real train replies without DP."""
    init = workspace.methods[0].init_params(SEED)
    return init, train_replies(RunSpec(cfg, SEED, "trip", TARGET), init, {})


def copies(replies: list[Message]) -> list[Message]:
    """Fresh replies with the same records (Flower's server-side wrapper clips the ones it gets in place)."""
    return [Message(RecordDict({"arrays": ArrayRecord(dict(r.content["arrays"])), "metrics": r.content["metrics"]}),
                    reply_to=train_message(RecordDict(), r.metadata.src_node_id)) for r in replies]


def test_client_side_clipping_clips_real_updates_and_an_infinite_norm_leaves_them_bit_for_bit(cfg, plain):
    spec, (init, replies) = RunSpec(cfg, SEED, "trip", TARGET), plain
    update = update_of(replies[0], init)
    norm = 0.5 * float(update.norm())
    [clipped] = train_replies(spec, init, {KEY_CLIPPING_NORM: norm}, nodes=1)
    clipped_update = update_of(clipped, init)
    assert float(clipped_update.norm()) == pytest.approx(norm, rel=1e-4)
    assert torch.allclose(clipped_update, update * norm / update.norm(), atol=1e-6)  # the direction is kept
    [unclipped] = train_replies(spec, init, {KEY_CLIPPING_NORM: math.inf}, nodes=1)
    assert torch.equal(from_record(unclipped.content["arrays"])["experts"],
                       from_record(replies[0].content["arrays"])["experts"])


def server_side_step(clipping_norm: float, workspace, init: dict) -> TripStrategy:
    spec = RunSpec(parse_config(with_dp(mode="server", clipping_norm=clipping_norm, noise_multiplier=0.0)), SEED,
                   "trip", TARGET)
    strategy = TripStrategy(workspace.methods[0], spec, [Peer(10 + i, d, (0,)) for i, d in enumerate(spec.sources)],
                            None, on_round=lambda _: None)
    assert isinstance(strategy.train_step, ServerSideClipping) and strategy.train_step.num_sampled_clients == 3
    strategy.server.params = init
    strategy.train_step.current_arrays = to_record(init)
    return strategy


def test_server_side_clipping_averages_the_clipped_real_updates(workspace, plain):
    init, replies = plain
    sizes = [r.content["metrics"]["num-examples"] for r in replies]
    updates = [update_of(r, init).view_as(init["experts"]) for r in replies]
    assert min(float(u.norm()) for u in updates) > 2e-3  # both are clipped
    clipped = fedavg([{"experts": u * 1e-3 / u.norm()} for u in updates], sizes)["experts"]
    arrays, _ = server_side_step(1e-3, workspace, init).train_step.aggregate_train(1, copies(replies))
    assert torch.allclose(from_record(arrays)["experts"] - init["experts"], clipped, rtol=1e-3, atol=1e-8)


def test_server_side_dp_at_noise_zero_and_an_infinite_norm_aggregates_bit_for_bit(workspace, plain):
    """(The same for client-side DP, in a real federation: below.)"""
    init, replies = plain
    arrays, _ = server_side_step(math.inf, workspace, init).train_step.aggregate_train(1, copies(replies))
    average = fedavg([from_record(r.content["arrays"]) for r in replies],
                     [r.content["metrics"]["num-examples"] for r in replies])
    assert torch.equal(from_record(arrays)["experts"], average["experts"])


# --- real Flower federations ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    with LocalFederation(PARTITIONS, tmp_path_factory.mktemp("dp-flower") / "logs") as fed:
        yield fed


@pytest.fixture(scope="module")
def reference(cfg, workspace):
    """The plain run (the Flower engine gives the in-process engine's numbers bit for bit: tests/test_flower.py)."""
    ws = workspace
    return run_federation(ws.methods[0], ws.clients(TARGET, SEED), ws.target(TARGET), cfg.train, SEED, lambda _: None)


def without(history: list[dict], *keys: str) -> list[dict]:
    return [{k: v for k, v in record.items() if k not in keys} for record in history]


@pytest.mark.flower
def test_noise_zero_and_an_infinite_clipping_norm_give_the_plain_run(workspace, reference, federation, tmp_path):
    """Client-side DP (Flower's wrapper on the server, the clipping mod on the ClientApps)."""
    dp_cfg = parse_config(with_dp(mode="client", clipping_norm=math.inf, noise_multiplier=0.0))
    got = FlowerRuns(federation, dp_cfg, tmp_path)(workspace.methods[0], TARGET, SEED, lambda _: None)
    assert without(got.history, "time_s", "dp") == without(reference.history, "time_s")
    assert select_round(got.history, "bma") == select_round(reference.history, "bma")  # the results.json entry
    for model, params in reference.models.items():
        assert torch.equal(got.models[model]["experts"], params["experts"]), model
    assert [r["dp"]["epsilon"] for r in got.history] == [None, None]  # infinite: strict JSON writes null


@pytest.mark.flower
def test_noise_reports_a_growing_epsilon_and_changes_the_run(workspace, reference, federation, tmp_path):
    """Server-side DP."""
    dp_cfg = parse_config(with_dp(mode="server", clipping_norm=0.05, noise_multiplier=1.0, delta=1e-4))
    got = FlowerRuns(federation, dp_cfg, tmp_path)(workspace.methods[0], TARGET, SEED, lambda _: None)
    eps = [r["dp"]["epsilon"] for r in got.history]
    assert 0 < eps[0] < eps[1] < math.inf
    assert got.history[0]["dp"]["delta"] == 1e-4 and got.history[0]["dp"]["sample_rate"] == 1.0
    assert not np.allclose(got.models["server"]["experts"], reference.models["server"]["experts"])
