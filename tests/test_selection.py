"""Few-shot clients (`data.shots_per_class`) and explicit model selection: the source-validation round beside
the last round and the test-selected ("oracle") round (issue 15, items 1 and 4)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trip.config import parse_config
from trip.data.folder import split_indices
from trip.errors import TripError
from trip.experiment import prepare
from trip.federation.partition import few_shot
from trip.federation.rounds import select_round
from trip.plan import format_plan, make_plan
from trip.report import Run, build_report
from trip.results import Planned, write_summary
from trip.viz import RunFiles

SEED, TARGET = 5, "photo"
CONFIG = {"name": "fewshot", "seeds": [SEED], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
          "data": {"name": "synthetic", "images_per_class": 10, "targets": [TARGET], "val_fraction": 0.3},
          "train": {"rounds": 2, "batch_size": 8}, "methods": [{"name": "zeroshot"}]}
SOURCES = ["cartoon", "sketch", "painting"]


def _cfg(data: dict | None = None, federation: dict | None = None):
    return parse_config({**CONFIG, "data": {**CONFIG["data"], **(data or {})}, "federation": federation or {}})


@pytest.fixture(scope="module")
def workspace():
    return prepare(_cfg())


def _with(ws, **kwargs):
    """The same loaded workspace under another data/federation config (clients are made from the config)."""
    return dataclasses.replace(ws, cfg=_cfg(**kwargs))


def test_few_shot_keeps_k_per_class_by_label_and_is_seeded():
    labels = np.array([0, 0, 0, 1, 2, 2, 2, 2, 0, 2])
    kept = few_shot(labels, 2, SEED, 0, 0)
    assert np.bincount(labels[kept]).tolist() == [2, 1, 2] and np.all(np.diff(kept) > 0)
    assert np.array_equal(kept, few_shot(labels, 2, SEED, 0, 0))
    draws = {tuple(few_shot(labels, 2, s, d, c)) for s in range(4) for d in range(2) for c in range(2)}
    assert len(draws) > 1  # seed, domain and client each draw their own
    assert np.array_equal(few_shot(labels, None, SEED, 0, 0), np.arange(10))


@pytest.mark.parametrize("k", [1, 2])  # clients per domain
def test_two_shots_per_class_on_every_client_with_whole_val_and_target(workspace, k):
    full = _with(workspace, federation={"clients_per_domain": k})
    shots = _with(workspace, data={"shots_per_class": 2}, federation={"clients_per_domain": k})
    classes = len(workspace.dataset.classes)
    for a, b in zip(full.clients(TARGET, SEED), shots.clients(TARGET, SEED), strict=True):
        available = torch.bincount(a.train.labels, minlength=classes)
        counts = torch.bincount(b.train.labels, minlength=classes)
        assert torch.equal(counts, available.clamp(max=2)) and (available > 2).sum() >= 3
        if k == 1:  # a whole domain has at least 2 train images of every class: exactly 2 of each
            assert torch.equal(counts, torch.full((classes,), 2))
        assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.features, b.val.features)
        assert b.weight == a.weight - len(a.train.labels) + len(b.train.labels)
    assert len(shots.target(TARGET).labels) == len(workspace.domains[TARGET])


def test_unchanged_without_shots(workspace):
    """`shots_per_class: null` gives the clients of before: the train split in its seeded order."""
    for c in workspace.clients(TARGET, SEED):
        idx = workspace.client_images(c.name, SEED)[c.name]
        train, _, images = workspace.client_splits(c.name, SEED)[c.name]
        assert images == len(idx) and np.array_equal(train, idx[split_indices(len(idx), 0.3, SEED)[0]])
        assert torch.equal(c.train.labels, torch.as_tensor(workspace.domains[c.name].labels[train]))


def test_the_record_names_the_classes_short_of_k(workspace):
    ws = _with(workspace, data={"shots_per_class": 8})
    lists = ws.client_lists(SEED, SOURCES)
    for name, entry in lists.items():
        labels = {p: int(lab) for p, lab in zip(ws.domains[name].paths, ws.domains[name].labels, strict=True)}
        counts = np.bincount([labels[p] for p in entry["train"]], minlength=len(ws.dataset.classes))
        assert entry["classes_under_shots"] == {ws.dataset.classes[c]: int(n) for c, n in enumerate(counts) if n < 8}
        assert len(entry["val"]) == 18 and counts.max() <= 8
        assert entry["classes_under_shots"]  # 42 train images over 6 classes: some class has fewer than 8
    assert "classes_under_shots" not in workspace.client_lists(SEED, SOURCES)[SOURCES[0]]


def test_the_dry_run_shows_the_few_shot_sizes():
    out = format_plan(make_plan(_cfg(data={"shots_per_class": 2})))
    assert "few-shot  2 train image(s) per class per client" in out
    assert "cartoon 12/18" in out  # 6 classes × 2 train / 60 · 0.3 validation
    assert "cartoon 42/18" in format_plan(make_plan(_cfg()))
    with pytest.raises(TripError, match="shots_per_class"):
        _cfg(data={"shots_per_class": 0})


def _history(rows: list[tuple[float, float]]) -> list[dict]:
    """(mean source-validation accuracy, target accuracy) of the server model per round."""
    return [{"round": r, "eval": {"server": {"val_mean": v, "target": t}}} for r, (v, t) in enumerate(rows)]


@pytest.mark.parametrize("rows, chosen, oracle", [
    ([(50, 10), (70, 30), (70, 40), (60, 40), (65, 20)], 1, 2),  # ties: the first round, for both rules
    ([(80, 55), (40, 60), (40, math.nan)], 0, 1),  # a round without a target accuracy is never the oracle
    ([(10, 90)], 0, 0),
])
def test_each_selection_rule_picks_its_round(rows, chosen, oracle):
    got = select_round(_history(rows), "server")
    assert (got["selected_round"], got["acc"], got["val_mean"]) == (chosen, rows[chosen][1], rows[chosen][0])
    assert (got["oracle_round"], got["acc_oracle"]) == (oracle, rows[oracle][1])
    assert got["last_round"] == len(rows) - 1 and np.array_equal([got["acc_last"]], [rows[-1][1]], equal_nan=True)


def test_the_tables_label_each_rule(tmp_path: Path):
    cfg = _cfg()
    entries = [{"method": "zeroshot", "target": TARGET, "seed": SEED, "acc": 61.0, "acc_last": 58.5,
                "acc_oracle": 64.25, "comm_params_per_round": 0, "comm_bytes_per_round": 0, "rounds": 2,
                "time_s": 1.0}]
    summary = write_summary(tmp_path, cfg, entries)
    assert "Model selection: source validation." in summary and "| zeroshot | 61.00 | 61.00 |" in summary
    results = {"experiment": cfg.name, "dataset": "synthetic", "runs": entries}
    run = Run(tmp_path, "r", RunFiles(results, [], None), Planned.of(cfg))
    report = build_report([run], tmp_path, tmp_path / "figures")
    assert "| r | zeroshot | 61.00 | 61.00 |" in report
    assert "| zeroshot (last round) | 58.50 | 58.50 |" in report
    assert "| zeroshot (test-selected (oracle)) | 64.25 | 64.25 |" in report
    old = {**results, "runs": [{k: v for k, v in entries[0].items() if k not in ("acc_last", "acc_oracle")}]}
    assert "other model-selection rules" not in build_report([dataclasses.replace(run, files=RunFiles(old, [], None))],
                                                              tmp_path, tmp_path / "figures")
