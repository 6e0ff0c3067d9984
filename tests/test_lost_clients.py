"""Rounds that lost clients (issue 22): the rule on round records alone, a checkpoint of such a round is never
the base of a resume, the local federation stops its ServerApp before its SuperNodes, and summary.md names the
rounds and clients. The end-to-end check (a Flower run stopped during a round resumes to the uninterrupted run's
results) is in tests/test_signals.py."""

from __future__ import annotations

import json

import pytest
import torch

from trip.checkpoint import FederationState, RunCheckpoints
from trip.errors import TripError
from trip.federation.flower import local
from trip.lost_clients import lost_clients, report_lines

CLIENTS = ["cartoon", "sketch", "painting"]


def record(r: int = 1, participants=CLIENTS, dropped=(), failed=None, validated=CLIENTS, **extra) -> dict:
    val = {c: 50.0 for c in validated}
    return {"round": r, "lr": 0.002, "sampled": list(CLIENTS), "dropped": list(dropped),
            "participants": list(participants), "failed": failed or {},
            "eval": {m: {"val": val, "val_mean": 50.0, "target": 40.0} for m in ("server", "bma")}, **extra}


def test_a_round_as_configured_lost_nothing_and_seeded_drops_are_by_design():
    assert lost_clients(record()) == {}
    assert lost_clients(record(participants=["cartoon", "painting"], dropped=["sketch"])) == {}
    everyone_dropped = record(participants=[], dropped=CLIENTS)
    assert lost_clients(everyone_dropped) == {}
    assert lost_clients({"round": 0, "eval": record()["eval"]}) == {}  # an untrained method's only round


def test_a_round_that_trained_or_validated_without_a_client_lost_it_even_with_an_empty_failed():
    trained_on_one = record(participants=["cartoon"], failed={"sketch": "update refused: the node failed: "
                                                                        "Error: Node Unavailable"})
    assert lost_clients(trained_on_one) == {"sketch": "update refused: the node failed: Error: Node Unavailable",
                                            "painting": "asked to train, sent no accepted update"}
    validated_on_two = record(validated=["cartoon", "sketch"])  # what a stopped run once wrote: failed {}
    assert lost_clients(validated_on_two) == {"painting": "no validation accuracy"}
    held_out_node = record(failed={"photo": "evaluation failed: no metrics"})
    assert lost_clients(held_out_node) == {"photo": "evaluation failed: no metrics"}


def state(next_round: int, history: list[dict]) -> FederationState:
    return FederationState(next_round, {"w": torch.full((2,), float(next_round))}, None, 0.0, history)


def test_a_checkpoint_ending_with_a_round_that_lost_clients_is_never_resumed_from(tmp_path, capsys):
    ckpts = RunCheckpoints(tmp_path / "run")
    ckpts.save(state(1, [record(0)]))
    ckpts.save(state(2, [record(0), record(1, validated=["cartoon"])]))
    base = ckpts.latest()
    assert base.next_round == 1 and base.params["w"].tolist() == [1.0, 1.0]
    assert "its round 1 lost sketch (no validation accuracy), painting (no validation accuracy)" in \
        capsys.readouterr().err

    only_short = RunCheckpoints(tmp_path / "short")
    only_short.save(state(3, [record(0), record(1), record(2, participants=["cartoon"])]))
    with pytest.raises(TripError, match=f"delete {tmp_path / 'short'} to run this .* again from its first round"):
        only_short.latest()


def test_the_local_federation_stops_its_serverapp_before_its_supernodes(tmp_path, monkeypatch):
    fed = local.LocalFederation(["partition-id=0", "partition-id=1"], tmp_path / "logs")
    fed.superlink, fed.nodes = ["superlink", "serverapp workers"], [["supernode0"], ["supernode1"]]
    stopped = []
    monkeypatch.setattr(local, "terminate", stopped.append)
    fed.stop()
    assert stopped == [["serverapp workers"], ["supernode0"], ["supernode1"], ["superlink"]]
    assert not fed.home.exists()


def test_summary_names_each_round_that_lost_clients_and_says_nothing_without(tmp_path):
    from trip.results import lost_client_lines

    key = {"method": "trip", "target": "photo", "seed": 3}
    records = [{**key, **record(0)}, {**key, **record(1, participants=["cartoon", "painting"],
                                                      failed={"sketch": "no reply within 60 s"})},
               {**key, **record(2, validated=["cartoon", "sketch"])}]
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:1]))
    assert lost_client_lines(tmp_path) == []
    (tmp_path / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = lost_client_lines(tmp_path)
    assert lines[0] == "## Rounds that lost clients"
    assert report_lines(records) == ["- trip, held out photo, seed 3: round 1: sketch (no reply within 60 s); "
                                     "round 2: painting (no validation accuracy)"]
    assert report_lines(records)[0] in lines
