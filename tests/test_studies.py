"""`trip study`: the arms' configs, the routing-stability measure, and one quick study run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from trip.studies import STUDIES, _matched_disagreement, arm_config, run_study


def test_top_experts_are_compared_after_matching_the_expert_labels():
    a = torch.tensor([0, 0, 1, 2, 3])
    assert _matched_disagreement(a, torch.tensor([2, 2, 0, 1, 3]), 4) == 0.0  # the same partition, relabelled
    assert _matched_disagreement(a, torch.tensor([2, 2, 0, 0, 3]), 4) == pytest.approx(0.2)
    assert _matched_disagreement(a, torch.tensor([1, 1, 1, 1, 1]), 4) == pytest.approx(0.6)


def test_each_arm_is_the_demo_config_with_its_change_and_the_seed_as_key_seed():
    ladder = STUDIES["shift-ladder"]
    half = next(a for a in ladder.arms if a.name == "shift 0.5")
    cfg = arm_config(ladder, half, seed=2, quick=False)
    assert cfg.data.shift == 0.5 and cfg.seeds == [2] and cfg.data.targets == "all"
    assert {m.key_seed for m in cfg.methods if m.name == "trip"} == {2}
    anchor = STUDIES["anchor"]
    blind = arm_config(anchor, anchor.arms[0], seed=0, quick=True)
    assert blind.backbone.pretrain_styles == ["photo", "cartoon", "painting"] and blind.data.targets == ["sketch"]
    assert blind.train.rounds == 2 and arm_config(anchor, anchor.arms[1], 0, False).backbone.pretrain_styles is None
    assert [m.kl_weight for m in blind.methods if m.name == "trip"] == [0.0, 0.2, 0.8, 1.0]


@pytest.mark.slow
def test_a_quick_study_writes_its_table_figure_and_routing(tmp_path):
    out = run_study("lite", tmp_path / "lite", seeds=[0, 1], quick=True)
    doc = json.loads((out / "study.json").read_text())
    methods = {"zeroshot", "linear-probe", "TRIP", "TRIP-Lite"}
    assert {r["method"] for r in doc["runs"]} == methods and len(doc["runs"]) == len(methods) * 4 * 2
    routing = doc["routing"]["TRIP vs TRIP-Lite"]
    assert 0 <= routing["between_seeds"] <= 1 and 0 <= routing["train_vs_infer"] <= 1
    assert 0 < routing["entropy"] <= 1 + 1e-9
    table = (out / "study.md").read_text()
    assert "| TRIP vs TRIP-Lite | TRIP-Lite |" in table and " ± " in table
    assert (out / "study.png").stat().st_size > 10_000
    again = run_study("lite", tmp_path / "lite", seeds=[0, 1], quick=True)  # the same folders: runs kept
    assert json.loads((again / "study.json").read_text())["runs"] == doc["runs"]


def test_routing_is_measured_for_the_token_routed_arms_only():
    from trip.studies import routed_label

    router = STUDIES["router"]
    labels = {arm.name: routed_label(router, arm) for arm in router.arms}
    assert labels["learned router"] is None and labels["image-level"] is None
    assert labels["M=1"] == "M=1" and labels["k-means tol 0"] == "k-means tol 0"
    assert {routed_label(STUDIES["anchor"], arm) for arm in STUDIES["anchor"].arms} == {"TRIP kl 1"}
