"""The fast paths of trip.routing (fp32 NumPy key sort, compaction of converged images, the unchanged-
assignment stop, CPU blocks) give exactly the results of the official-style oracle."""

from __future__ import annotations

import pytest
import torch

from trip.reference_router import capacity_constrained_assignment, reference_kmeans, reference_weights
from trip.routing import (
    _greedy_capacity_assign,
    _group_order,
    assign_experts,
    capacity_kmeans,
    mixture_weights,
    static_keys,
)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One BLAS thread: an image's matmul then rounds the same whatever the batch (see trip.routing)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _costs(b: int, n: int, m: int, seed: int) -> list[torch.Tensor]:
    """fp32 costs [b, n, m]: continuous, signed, small-integer ties, and signed zeros."""
    g = torch.Generator().manual_seed(seed)
    zeros = torch.randint(0, 2, (b, n, m), generator=g).float() * 2 - 1  # ±1
    return [
        torch.rand(b, n, m, generator=g),
        torch.randn(b, n, m, generator=g),
        torch.randint(-2, 3, (b, n, m), generator=g).float(),
        zeros * 0.0,  # a mix of +0.0 and -0.0: equal costs
    ]


def _generic_order(pref: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(best, dim=1, stable=True)
    return order.gather(1, torch.argsort(pref.gather(1, order), dim=1, stable=True))


@pytest.mark.parametrize("seed", range(3))
def test_fp32_key_sort_equals_two_stable_sorts(seed):
    for cost in _costs(5, 197, 4, seed):
        best, pref = cost.min(-1)
        assert torch.equal(_group_order(pref, best, 4), _generic_order(pref, best))


@pytest.mark.parametrize("seed", range(3))
def test_fp32_greedy_equals_sequential_loop(seed):
    g = torch.Generator().manual_seed(100 + seed)
    for cost in _costs(4, 60, 5, seed):
        cap = torch.randint(0, 20, (5,), generator=g)
        assign, counts = _greedy_capacity_assign(cost, cap)
        for b in range(cost.shape[0]):
            ref = capacity_constrained_assignment(cost[b], cap)
            assert torch.equal(assign[b], ref)
            assert counts[b].tolist() == [(ref == k).sum().item() for k in range(5)]


def _clip_like(b: int, seed: int) -> torch.Tensor:
    """[b, 197, 768] fp32 tokens around a few centres, so clusters and capacities bind."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(b, 6, 768, generator=g)
    which = torch.randint(0, 6, (b, 197), generator=g)
    return centres.gather(1, which[..., None].expand(-1, -1, 768)) + torch.randn(b, 197, 768, generator=g)


def _init(b: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(197, generator=g)[:4] for _ in range(b)])


@pytest.mark.parametrize(("alpha", "kwargs"), [(1.0, {}), (2.0, {}), (None, {}), (1.0, {"tol": 0.0, "max_iters": 7}),
                                               (1.0, {"max_iters": 2})])
def test_fp32_clip_shape_matches_reference(alpha, kwargs):
    x, init, keys = _clip_like(6, seed=1), _init(6, seed=2), static_keys(4, 768, seed=3)
    res = capacity_kmeans(x, 4, alpha, init_index=init, block_size=4, **kwargs)
    w = mixture_weights(res.counts, assign_experts(res.centroids, keys))
    for b in range(6):
        assign, centroids, sizes = reference_kmeans(x[b], 4, alpha, init[b], **kwargs)
        assert torch.equal(res.assign[b], assign)
        assert torch.equal(res.counts[b], sizes)
        torch.testing.assert_close(res.centroids[b], centroids, rtol=0, atol=1e-4)
        assert torch.equal(w[b], reference_weights(centroids, sizes, keys))


def test_block_size_and_position_do_not_change_results():
    x, init = _clip_like(9, seed=4), _init(9, seed=5)
    full = capacity_kmeans(x, 4, 1.0, init_index=init, block_size=9)
    assert full.iterations.unique().numel() > 1  # images converge at different iterations (compaction)
    for block in (1, 2, 4, 32):
        other = capacity_kmeans(x, 4, 1.0, init_index=init, block_size=block)
        for f in ("assign", "counts", "centroids", "iterations"):
            assert torch.equal(getattr(full, f), getattr(other, f)), (block, f)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    shuffled = capacity_kmeans(x[perm], 4, 1.0, init_index=init[perm], block_size=4)
    assert torch.equal(shuffled.centroids, full.centroids[perm])


def test_max_iters_must_be_positive():
    with pytest.raises(ValueError):
        capacity_kmeans(torch.randn(1, 30, 4), 2, 1.0, max_iters=0)
