"""protocol: multidomain (issue 15, items 3, 5, 6): every domain is a client, tested on its own held-out split with
the deployed model and with each client's personalised model; per-domain tables; the same under both engines."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from trip.cli import main
from trip.config import ALL_DOMAINS, parse_config
from trip.data.folder import Domain
from trip.data.holdout import in_domain_split
from trip.errors import TripError
from trip.experiment import prepare, run_experiment
from trip.federation import multidomain
from trip.federation.partition import client_domain
from trip.report import build_report, load_runs

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
os.environ["TRIP_PLUGINS"] = "contract_method"  # Flower's processes import it (tests/ is on their PYTHONPATH)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
import contract_method  # noqa: E402, F401  (registers the test-only method, which has personalised models)

SEED = 4
DOMAINS = ["photo", "cartoon", "sketch", "painting"]
CONFIG = {"name": "multidomain", "protocol": "multidomain", "seeds": [SEED], "device": "cpu",
          "backbone": {"name": "tiny", "pretrained": None}, "data": {"name": "synthetic", "images_per_class": 3},
          "train": {"rounds": 2, "batch_size": 8, "lr": 0.002},
          "methods": [{"name": "zeroshot", "templates": "single"}, {"name": "linear-probe"},
                      {"name": "fedotp", "n_ctx": 2}, {"name": "contract-test"}]}
PERSONALISED = {"fedotp", "contract-test"}
TABLE_HEADER = "| method | photo | cartoon | sketch | painting | mean | params/round |"


@pytest.fixture(scope="module")
def workspace():
    return prepare(parse_config(CONFIG))


@pytest.fixture(scope="module")
def inprocess(workspace, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("multidomain") / "inprocess"
    run_experiment(workspace.cfg, out)
    return out


def _results(run_dir: Path) -> list[dict]:
    runs = json.loads((run_dir / "results.json").read_text())["runs"]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in runs]


def _rounds(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def test_held_out_domains_are_refused_under_multidomain(tmp_path, capsys):
    with pytest.raises(TripError, match="protocol multidomain holds none out"):
        parse_config({**CONFIG, "data": {"name": "synthetic", "targets": ["photo"]}})
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({**CONFIG, "data": {"name": "synthetic", "targets": ["photo"]}}))
    assert main(["run", str(config), "--dry-run"]) == 2
    assert "remove data.targets, or choose protocol lodo" in capsys.readouterr().err


def test_the_test_split_is_fixed_disjoint_or_the_official_files(tmp_path):
    domain = Domain("photo", tmp_path, [f"photo/c/{i}.png" for i in range(10)], np.zeros(10, dtype=np.int64))
    rest, test = in_domain_split(domain, 0.2, official=False)
    assert len(test) == 2 and np.array_equal(np.sort(np.concatenate([rest, test])), np.arange(10))
    assert all(np.array_equal(a, b) for a, b in zip((rest, test), in_domain_split(domain, 0.2, False), strict=True))
    (tmp_path / "photo_train.txt").write_text("".join(f"photo/c/{i}.png 0\n" for i in range(7)))
    (tmp_path / "photo_test.txt").write_text("".join(f"photo/c/{i}.png 0\n" for i in (7, 8, 9)))
    rest, test = in_domain_split(domain, 0.2, official=True)
    assert test.tolist() == [7, 8, 9] and rest.tolist() == list(range(7))
    with pytest.raises(TripError, match="in-domain test split is empty"):
        in_domain_split(domain, 0.05, official=False)


def test_clients_never_hold_their_domains_test_split(workspace):
    cfg = workspace.cfg.model_copy(update={"federation": workspace.cfg.federation.model_copy(
        update={"clients_per_domain": 2})})
    for ws, k in ((workspace, 1), (dataclasses.replace(workspace, cfg=cfg), 2)):
        clients = [client_domain(c.name) for c in ws.clients(ALL_DOMAINS, SEED)]
        assert len(clients) == 4 * k and list(dict.fromkeys(clients)) == DOMAINS
        for d in DOMAINS:
            test = set(ws.tests[d].tolist())
            assert len(test) == 3 and ws.tests[d].tolist() == in_domain_split(ws.domains[d], 0.2, False)[1].tolist()
            held = [set(i.tolist()) for train, val, _ in ws.client_splits(d, SEED).values() for i in (train, val)]
            assert all(not (h & test) for h in held) and set().union(*held) <= set(ws.clients_share(d).tolist())


def test_a_domains_personalised_accuracy_is_the_mean_over_its_clients():
    val = {"server": {"photo/0": 50.0, "photo/1": 70.0, "sketch/0": 10.0, "sketch/1": 30.0}}
    ev = multidomain.eval_record(val, {"server": {"photo": 40.0, "sketch": 20.0}},
                                 {"server": {"photo/0": 80.0, "photo/1": 60.0, "sketch/0": 0.0, "sketch/1": 20.0}})
    assert ev["server"]["target"] == 30.0 and ev["server"]["val_mean"] == 40.0
    assert ev["server"]["personal"] == {"photo": 70.0, "sketch": 10.0} and ev["server"]["personal_mean"] == 40.0
    assert "personal" not in multidomain.eval_record(val, {"server": {"photo": 1.0}}, {"server": {"photo/0": None}})


def test_four_clients_four_in_domain_accuracies_per_method(inprocess):
    runs = _results(inprocess)
    assert [(r["method"], r["target"]) for r in runs] == [(m["name"], ALL_DOMAINS) for m in CONFIG["methods"]]
    for run in runs:
        assert run["clients"] == DOMAINS and list(run["domains"]) == DOMAINS
        assert run["acc"] == pytest.approx(np.mean(list(run["domains"].values())))
        assert ("personal" in run) == (run["method"] in PERSONALISED)
        if run["method"] in PERSONALISED:
            assert list(run["personal"]) == DOMAINS and list(run["personal_last"]) == DOMAINS
    personal = [r["eval"]["server"] for r in _rounds(inprocess) if r["method"] == "contract-test"]
    assert any(e["personal"] != e["test"] for e in personal)  # its own offset and gain, not the deployed mean
    summary = (inprocess / "summary.md").read_text()
    assert summary.count(TABLE_HEADER) == 2 and "## Personalised models" in summary


def test_the_report_tables_domains_and_mean_for_global_and_personalised(inprocess, tmp_path):
    report = build_report(load_runs([inprocess]), tmp_path, tmp_path / "figures")
    section = report.split("## In-domain test accuracy")[1].split("\n## ")[0]
    assert section.count(TABLE_HEADER) == 5  # selected, personalised, and last/oracle
    personal = section.split("#### Personalised models (")[1].split("####")[0]
    assert "| fedotp |" in personal and "| contract-test |" in personal and "| zeroshot |" not in personal
    assert "## Target accuracy (%)" not in report  # no held-out domain, no LODO table


def test_a_run_resumed_from_an_earlier_round_equals_the_uninterrupted_one(inprocess, workspace, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(inprocess, resumed)
    (resumed / "results.json").unlink()
    for last in resumed.glob("checkpoints/*/round-0001.safetensors"):
        last.unlink()  # round 1 is trained again, from round 0's checkpoint (private tensors included)
    run_experiment(workspace.cfg, resumed, resume=True)
    in_order = lambda records: sorted(records, key=lambda r: (r["method"], r["round"]))  # noqa: E731
    assert _results(resumed) == _results(inprocess) and in_order(_rounds(resumed)) == in_order(_rounds(inprocess))


@pytest.mark.flower
def test_both_engines_give_the_same_in_domain_results(inprocess, workspace, tmp_path):
    run_experiment(workspace.cfg, tmp_path / "flower", engine="flower")
    assert _results(tmp_path / "flower") == _results(inprocess)
    assert _rounds(tmp_path / "flower") == _rounds(inprocess)
