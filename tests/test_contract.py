"""The method contract over the whole registry: every method, two rounds on a tiny tree, under the in-process
engine and the Flower engine (one local federation for all of them), bit-identical on CPU; and a kill-and-resume
of the test-only method with private state equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

from trip.checkpoint import RunCheckpoints
from trip.config import parse_config
from trip.experiment import prepare, run_experiment
from trip.federation.inprocess import run_federation
from trip.federation.rounds import select_round, selection_model

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
os.environ["TRIP_PLUGINS"] = "contract_method"  # Flower's processes import it (tests/ is on their PYTHONPATH)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
import contract_method  # noqa: E402  (registers the test-only method)

SEED, TARGET = 5, "photo"
METHODS = [{"name": "zeroshot", "templates": "single"}, {"name": "linear-probe"}, {"name": "promptfl", "n_ctx": 2},
           {"name": "trip", "num_experts": 2, "n_ctx": 2, "kmeans_iters": 5}, {"name": "trip-lite", "kmeans_iters": 5},
           {"name": "fedclip"}, {"name": "fedotp", "n_ctx": 2}, {"name": "fedapt", "n_ctx": 2},
           {"name": "contract-test"}]
CONFIG = {"name": "contract", "seeds": [SEED], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
          "data": {"name": "synthetic", "images_per_class": 3, "targets": [TARGET]},
          "train": {"rounds": 2, "batch_size": 8, "lr": 0.002}, "methods": METHODS}
LABELS = [m["name"] for m in METHODS]


@pytest.fixture(scope="module")
def workspace():
    return prepare(parse_config(CONFIG))


def _run(ws, label: str, **kwargs):
    method = next(m for m in ws.methods if m.label == label)
    return run_federation(method, ws.clients(TARGET, SEED), ws.target(TARGET), ws.cfg.train, SEED, lambda _: None,
                          **kwargs)


def test_every_method_is_registered_here():
    from trip.methods import _BY_CFG

    assert {c.model_fields["name"].annotation.__args__[0] for c in _BY_CFG} | {"trip-lite"} == set(LABELS)


@pytest.mark.parametrize("label", LABELS)
def test_every_method_trains_two_rounds_and_reports_its_comm(workspace, label):
    method = next(m for m in workspace.methods if m.label == label)
    result = _run(workspace, label)
    assert len(result.history) == (2 if method.trainable else 1)
    assert method.comm_params == sum(v.numel() for v in method.init_params(SEED).values())
    if method.trainable:
        assert result.history[-1]["participants"] == [d for d in workspace.dataset.domains if d != TARGET]


def test_the_test_method_uses_every_hook(workspace):
    method = next(m for m in workspace.methods if m.label == "contract-test")
    ws = workspace
    result = _run(ws, "contract-test")
    clients = ws.clients(TARGET, SEED)
    # the deployed model is the head plus the mean of the clients' trained offsets, not any client's own model
    deployed = result.models["server"]
    assert set(deployed) == {"head", "offset", "gain"}
    inits = [method.init_private(SEED, i, len(clients)) for i in range(len(clients))]
    assert not torch.equal(deployed["offset"], torch.stack([p["offset"] for p in inits]).mean(0))
    assert method.upload_params == deployed["offset"].numel()
    assert method.optimizer().name == "sgd" and method.aggregation == "uniform"
    # the selected round is the one whose deployed model has the best source-validation accuracy
    assert select_round(result.history, selection_model(method))["acc"] == \
        max(result.history, key=lambda h: (h["eval"]["server"]["val_mean"], -h["round"]))["eval"]["server"]["target"]


def test_kill_and_resume_of_a_method_with_private_state_equals_one_run(workspace, tmp_path):
    whole = _run(workspace, "contract-test")
    checkpoints = RunCheckpoints(tmp_path)
    saved = []

    def stop_after_first(state):
        checkpoints.save(state)
        saved.append(state.next_round)
        raise KeyboardInterrupt  # killed right after round 0's checkpoint

    with pytest.raises(KeyboardInterrupt):
        _run(workspace, "contract-test", on_round=stop_after_first)
    state = checkpoints.latest()
    assert saved == [1] and len(state.privates) == 3 and set(state.privates[0]) == {"offset", "gain"}
    resumed = _run(workspace, "contract-test", resume=state)
    assert [{k: v for k, v in h.items() if k != "time_s"} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k != "time_s"} for h in whole.history]
    for name, params in whole.models.items():
        assert all(torch.equal(params[k], resumed.models[name][k]) for k in params)


def _without_time(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "time_s"} for line in path.read_text().splitlines()]


@pytest.mark.flower
def test_both_engines_give_the_same_rounds_for_every_method(workspace, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    cfg = parse_config(CONFIG)
    run_experiment(cfg, tmp_path / "inprocess")
    run_experiment(cfg, tmp_path / "flower", engine="flower")
    rounds = [_without_time(tmp_path / e / "rounds.jsonl") for e in ("inprocess", "flower")]
    assert {r["method"] for r in rounds[0]} == set(LABELS)
    assert rounds[0] == rounds[1]
    runs = [{(r["method"]): {k: v for k, v in r.items() if k != "time_s"}
             for r in json.loads((tmp_path / e / "results.json").read_text())["runs"]} for e in ("inprocess", "flower")]
    assert runs[0] == runs[1]
    assert runs[0]["contract-test"]["comm_upload_once_params"] > 0 == runs[0]["promptfl"]["comm_upload_once_params"]
    assert contract_method.ContractMethod.aggregation == "uniform"
