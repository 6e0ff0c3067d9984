"""Many clients per domain (iid or Dirichlet label skew), seeded client sampling and drops, the same under every
engine (issue 14, items 1-3)."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from trip.config import FederationCfg, TrainCfg, parse_config
from trip.data.folder import split_indices
from trip.errors import TripError
from trip.experiment import prepare, run_experiment
from trip.federation.client import client_update
from trip.federation.flower.protocol import RunSpec, node_clients
from trip.federation.inprocess import run_federation
from trip.federation.partition import client_names, partition
from trip.federation.rounds import Server, participation, round_lr, round_seed
from trip.federation.server import fedavg

SEED, TARGET = 3, "photo"
LABELS = np.repeat(np.arange(6), 40)  # six classes of 40 images
FED = {"clients_per_domain": 20, "partition": "dirichlet", "dirichlet_alpha": 0.3, "min_client_size": 2,
       "fraction": 0.25, "drop_rate": 0.2}
CONFIG = {"name": "clients", "seeds": [SEED], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
          "data": {"name": "synthetic", "images_per_class": 20, "targets": [TARGET], "val_fraction": 0.5},
          "train": {"rounds": 2, "batch_size": 8, "lr": 0.002}, "federation": FED,
          "methods": [{"name": "promptfl", "n_ctx": 2}]}


def _covers(parts: list[np.ndarray], n: int) -> bool:
    return np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_one_client_per_domain_is_the_whole_domain_in_order():
    fed = FederationCfg(partition="dirichlet")
    assert [p.tolist() for p in partition(LABELS, fed, SEED, 0, "photo")] == [list(range(240))]
    assert client_names("photo", 1) == ["photo"] and client_names("photo", 3) == ["photo/0", "photo/1", "photo/2"]


def test_iid_clients_are_balanced_disjoint_and_seeded():
    fed = FederationCfg(clients_per_domain=7)
    parts = partition(LABELS, fed, SEED, 1, "cartoon")
    assert _covers(parts, 240) and {len(p) for p in parts} == {34, 35}
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, fed, SEED, 1, "cartoon"), strict=True))
    assert not np.array_equal(parts[0], partition(LABELS, fed, SEED + 1, 1, "cartoon")[0])
    assert not np.array_equal(parts[0], partition(LABELS, fed, SEED, 2, "cartoon")[0])  # per domain


def test_dirichlet_skews_the_labels_and_keeps_the_minimum():
    def max_class_share(fed):
        parts = partition(LABELS, fed, SEED, 0, "photo")
        assert _covers(parts, 240) and min(map(len, parts)) >= fed.min_client_size
        return np.mean([np.bincount(LABELS[p], minlength=6).max() / len(p) for p in parts])

    iid = max_class_share(FederationCfg(clients_per_domain=4))
    skewed = max_class_share(FederationCfg(clients_per_domain=4, partition="dirichlet", dirichlet_alpha=0.1))
    assert iid < 0.35 and skewed > iid + 0.25


@pytest.mark.parametrize("fed, cause", [
    (FederationCfg(clients_per_domain=50, min_client_size=5), "240 images, too few for 50 clients"),
    (FederationCfg(clients_per_domain=20, partition="dirichlet", dirichlet_alpha=0.01, min_client_size=10),
     "raise federation.dirichlet_alpha"),
])
def test_a_split_that_misses_the_minimum_is_refused(fed, cause):
    with pytest.raises(TripError, match=cause):
        partition(LABELS, fed, SEED, 0, "photo")


def test_participation_is_a_seeded_sample_less_the_drops():
    assert participation(FederationCfg(), SEED, 4, 9).reporting == list(range(9))
    fed = FederationCfg(fraction=0.25, drop_rate=0.2)
    draws = [participation(fed, SEED, r, 60) for r in range(200)]
    assert all(len(p.sampled) == 15 and set(p.dropped) <= set(p.sampled) for p in draws)
    assert draws[0] == participation(fed, SEED, 0, 60) and draws[0] != draws[1] != participation(fed, SEED + 1, 1, 60)
    rate = sum(len(p.dropped) for p in draws) / (15 * len(draws))
    assert 0.17 < rate < 0.23
    assert participation(FederationCfg(fraction=0.001), SEED, 0, 60).sampled  # never an empty sample


@pytest.fixture(scope="module")
def workspace():
    return prepare(parse_config(CONFIG))


def test_each_client_splits_its_own_images(workspace):
    ws = workspace
    clients = ws.clients(TARGET, SEED)
    sources = [d for d in ws.dataset.domains if d != TARGET]
    assert [c.name for c in clients] == [c for d in sources for c in client_names(d, 20)]
    images = ws.client_images("cartoon", SEED)
    for client in ws.domain_clients("cartoon", SEED):
        idx = images[client.name]
        train, val = split_indices(len(idx), 0.5, SEED)
        assert torch.equal(client.train.labels, torch.as_tensor(ws.domains["cartoon"].labels[idx[train]]))
        assert torch.equal(client.val.labels, torch.as_tensor(ws.domains["cartoon"].labels[idx[val]]))
        assert client.weight == len(idx)


def test_a_round_averages_the_clients_that_reported(workspace):
    ws, method = workspace, workspace.methods[0]
    fed, train = ws.cfg.federation, TrainCfg(rounds=1, batch_size=8, lr=0.002)
    clients = ws.clients(TARGET, SEED)
    result = run_federation(method, clients, ws.target(TARGET), train, SEED, lambda _: None, federation=fed)
    record, taking_part = result.history[0], participation(fed, SEED, 0, len(clients))
    names = [c.name for c in clients]
    assert record["sampled"] == [names[i] for i in taking_part.sampled] and record["dropped"]
    assert record["participants"] == [names[i] for i in taking_part.reporting]
    assert set(record["eval"]["server"]["val"]) == set(names)  # selection looks at every source client
    init = method.init_params(SEED)
    updates = [client_update(method, init, clients[i].train, train, round_lr(train, 0), round_seed(SEED, 0, i))
               for i in taking_part.reporting]
    expected = fedavg([u.params for u in updates], [clients[i].weight for i in taking_part.reporting])
    assert all(torch.equal(result.models["server"][k], expected[k]) for k in expected)


def test_a_round_in_which_every_client_dropped_keeps_the_global_tensors(workspace):
    method = workspace.methods[0]
    server = Server(method, TrainCfg(rounds=2), SEED, 3)
    before = {k: v.clone() for k, v in server.params.items()}
    server.aggregate(0, [], {})
    assert all(torch.equal(before[k], server.params[k]) for k in before)
    with pytest.raises(TripError, match="every client failed"):
        server.aggregate(1, [], {"photo/0": "non-finite loss"})


def _results(path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in json.loads(path.read_text())["runs"]]


def _rounds(path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()]


def _check_client_lists(doc: dict, ws) -> None:
    """Each client's train and validation images: disjoint, from its domain, all but the split's leftovers."""
    for domain in ("cartoon", "sketch", "painting"):
        lists = [doc[name] for name in client_names(domain, 20)]
        paths = [p for c in lists for p in c["train"] + c["val"]]
        assert len(set(paths)) == len(paths) and set(paths) <= set(ws.domains[domain].paths)
        assert len(paths) > len(ws.domains[domain]) - 20 and all(c["val"] and c["train"] for c in lists)


def test_the_client_lists_name_each_clients_images(workspace):
    _check_client_lists(workspace.client_lists(SEED, ["cartoon", "sketch", "painting"]), workspace)


@pytest.mark.flower
def test_the_three_engines_give_the_same_results_with_sampled_skewed_clients(workspace, tmp_path):
    """In-process, a SuperNode per domain (flower) and a virtual SuperNode per client (flower-sim, ray)."""
    engines = ("inprocess", "flower", "flower-sim")
    for engine in engines:
        run_experiment(workspace.cfg, tmp_path / engine, engine=engine)
    _check_client_lists(json.loads((tmp_path / "flower" / "clients.json").read_text())[str(SEED)], workspace)
    results = [_results(tmp_path / e / "results.json") for e in engines]
    assert results[0] == results[1] == results[2]
    rounds = [_rounds(tmp_path / e / "rounds.jsonl") for e in engines]
    assert rounds[0] == rounds[1] == rounds[2] and all(r["dropped"] for r in rounds[0])
    assert results[2][0]["clients"] == [c.name for c in workspace.clients(TARGET, SEED)]


def test_a_node_serves_a_domain_or_a_run_of_its_clients_by_its_partition():
    """`flower`: a node per domain; `flower-sim`: a node per client (Flower sets num-partitions to the nodes)."""
    spec = RunSpec(parse_config(CONFIG), SEED, "promptfl", TARGET)  # 3 source domains of 20 clients
    assert node_clients({"partition-id": 1, "num-partitions": 3}, spec) == ("sketch", list(range(20)))
    assert node_clients({"partition-id": 45, "num-partitions": 60}, spec) == ("painting", [5])
    assert node_clients({"partition-id": 7, "num-partitions": 12}, spec) == ("sketch", [15, 16, 17, 18, 19])
    assert node_clients({"domain": "cartoon"}, spec) == ("cartoon", list(range(20)))
    assert node_clients({"domain": TARGET}, spec) == (TARGET, [])  # evaluates the held-out domain
    for parts in (2, 7, 120):
        with pytest.raises(TripError, match=f"num-partitions {parts} does not split the run's 60 clients"):
            node_clients({"partition-id": 0, "num-partitions": parts}, spec)
    with pytest.raises(TripError, match="partition-id 60 is out of range"):
        node_clients({"partition-id": 60, "num-partitions": 60}, spec)


def test_flower_sim_without_ray_is_refused_at_once_naming_the_extra(monkeypatch, tmp_path):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    with pytest.raises(TripError, match=r'needs ray .* pip install "trip-fl\[simulation\]"'):
        run_experiment(parse_config(CONFIG), tmp_path / "run", engine="flower-sim")
    assert not (tmp_path / "run").exists()


def test_the_dry_run_shows_the_clients_and_refuses_a_split_too_fine():
    from trip.plan import format_plan, make_plan

    cfg = parse_config({**CONFIG, "federation": {"clients_per_domain": 4, "fraction": 0.5}})
    out = format_plan(make_plan(cfg))
    assert "12 clients per run" in out and "4 per source domain (iid" in out and "cartoon 4 × 15–15/15–15" in out
    with pytest.raises(TripError, match="too few for 40 clients"):
        make_plan(parse_config({**CONFIG, "federation": {"clients_per_domain": 40, "min_client_size": 4}}))


@pytest.mark.flower
def test_secure_aggregation_and_dp_run_under_flower_sim(tmp_path):
    """Every virtual SuperNode of flower-sim is a SecAgg+ party; DP's epsilon grows round by round there too."""
    base = {**CONFIG, "federation": {}, "train": {**CONFIG["train"], "rounds": 2}}
    run_experiment(parse_config(base), tmp_path / "plain")
    sa = {**base, "federation": {"secure_aggregation": True}}
    run_experiment(parse_config(sa), tmp_path / "secagg", engine="flower-sim")
    secure = _rounds(tmp_path / "secagg" / "rounds.jsonl")
    assert [r["secure_aggregation"]["nodes"] for r in secure] == [["cartoon", "sketch", "painting"]] * 2
    # The secure aggregate lies within ~1e-5 of FedAvg's (docs/federation.md): at most a borderline image of a
    # client's 60 validation images may flip.
    for r, p in zip(secure, _rounds(tmp_path / "plain" / "rounds.jsonl"), strict=True):
        assert r["eval"]["server"]["val_mean"] == pytest.approx(p["eval"]["server"]["val_mean"], abs=100 / 60)
    dp = {**base, "federation": {"dp": {"mode": "client", "clipping_norm": 1.0, "noise_multiplier": 0.5}}}
    run_experiment(parse_config(dp), tmp_path / "dp", engine="flower-sim")
    eps = [r["dp"]["epsilon"] for r in _rounds(tmp_path / "dp" / "rounds.jsonl")]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] < float("inf")
