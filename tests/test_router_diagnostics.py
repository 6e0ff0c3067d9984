"""The router diagnostics of expert_usage.json (trip.expert_usage): collapse, on tokens routed by the real router,
and redundancy against a hand computation; the warning in the log and in summary.md."""

from __future__ import annotations

import pytest
import torch

from trip import expert_usage, routing
from trip.config import parse_config
from trip.results import write_summary

M, D = 4, 8


def _routed(groups: list[int], images: int = 6) -> torch.Tensor:
    """Mixture weights [images, M] of plain k-means (no capacity) on tokens made of groups: group e holds
    groups[e] copies of key e's direction, so each group is one cluster and Hungarian matching sends it to
    expert e."""
    keys = routing.static_keys(M, D, seed=0)
    tokens = torch.cat([keys[e].expand(n, D) for e, n in enumerate(groups)])
    ids = torch.arange(images)
    return routing.route(tokens.expand(images, -1, -1).contiguous(), keys, None, image_ids=ids, seed=0)


def _usage(weights: torch.Tensor) -> dict:
    return {"methods": {"trip": {"num_experts": M, "phases": {"train": {
        "capacity": None, "collapse_threshold": expert_usage.collapse_threshold(M),
        "domains": {"photo": expert_usage.domain_usage(weights)}}}}}}


def test_a_collapsed_router_is_reported():
    weights = _routed([61, 1, 1, 1])
    assert torch.allclose(weights, torch.tensor([61, 1, 1, 1]) / 64)  # the router made what the tokens say
    usage = _usage(weights)
    assert usage["methods"]["trip"]["phases"]["train"]["domains"]["photo"]["collapsed"]
    [line] = expert_usage.collapse_warnings(usage)
    assert "trip, train routing, domain photo: expert E1 receives 95.3% of the kept tokens" in line
    assert "threshold 62.5%" in line and "25.0%" in line


def test_a_balanced_router_is_not():
    weights = _routed([16, 16, 16, 16])
    assert torch.allclose(weights, torch.full((6, M), 0.25))
    usage = _usage(weights)
    assert not usage["methods"]["trip"]["phases"]["train"]["domains"]["photo"]["collapsed"]
    assert expert_usage.collapse_warnings(usage) == []


def test_the_threshold_is_halfway_between_balanced_and_collapsed():
    assert [expert_usage.collapse_threshold(m) for m in (1, 2, 4, 8)] == [1.0, 0.75, 0.625, 0.5625]
    one_expert = expert_usage.domain_usage(torch.ones(5, 1))
    assert not one_expert["collapsed"] and one_expert["redundancy"] is None  # one expert: nothing to compare


def test_redundancy_is_the_mean_weighted_jaccard_overlap_of_the_experts():
    weights = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    # E1/E2: (0.5 + 0 + 0.2) / (0.5 + 1 + 0.3); E1/E3: (0 + 0 + 0.2) / (0.5 + 1 + 0.5); E2/E3: 0.3 / (0.5 + 0.5)
    pairs = {(0, 1): 0.7 / 1.8, (0, 2): 0.2 / 2.0, (1, 2): 0.3 / 1.0}
    got = expert_usage.redundancy_pairs(weights)
    for (a, b), want in pairs.items():
        assert got[a, b].item() == pytest.approx(want) and got[b, a].item() == pytest.approx(want)
    assert torch.allclose(got.diagonal(), torch.ones(3, dtype=torch.float64))
    usage = expert_usage.domain_usage(weights)
    assert usage["redundancy"] == pytest.approx(sum(pairs.values()) / 3)
    assert expert_usage.domain_usage(_routed([16, 16, 16, 16]))["redundancy"] == pytest.approx(1.0)
    assert expert_usage.domain_usage(torch.eye(3))["redundancy"] == 0.0  # never on the same image


def test_an_unused_expert_overlaps_nothing():
    pairs = expert_usage.redundancy_pairs(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))
    assert torch.equal(pairs, torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_the_warning_closes_summary_md(tmp_path):
    cfg = parse_config({"name": "w", "data": {"name": "synthetic"}, "methods": [{"name": "zeroshot"}]})
    line = expert_usage.collapse_warnings(_usage(_routed([61, 1, 1, 1])))[0]
    text = write_summary(tmp_path, cfg, [], [line])
    assert text.endswith(f"## Warnings\n\n- {line}\n") and (tmp_path / "summary.md").read_text() == text
    assert "## Warnings" not in write_summary(tmp_path, cfg, [])
