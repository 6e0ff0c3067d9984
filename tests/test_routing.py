"""Tests of trip.routing against the literal official-style oracle in trip/reference_router.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment

from trip.reference_router import (
    capacity_constrained_assignment,
    reference_capacities,
    reference_kmeans,
    reference_route,
    reference_weights,
)
from trip.routing import (
    _cdist,
    _greedy_capacity_assign,
    _pad_for_cdist,
    assign_experts,
    capacities,
    capacity_kmeans,
    image_level_weights,
    init_indices,
    mixture_weights,
    route,
    static_keys,
)

_THREADS = max(2, torch.get_num_threads())


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny tensors: one thread is much faster, and it makes each image's BLAS matmul bit-identical
    whatever the batch size (see test_batched_equals_per_image_multithreaded for several threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def clustered_tokens(b: int, n: int, d: int, k: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """[b, n, d] tokens around k random centres (unequal cluster sizes, so capacities bind)."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(b, k, d, generator=g, dtype=dtype)
    which = torch.multinomial(torch.rand(b, k, generator=g), n, replacement=True, generator=g)
    noise = torch.randn(b, n, d, generator=g, dtype=dtype)
    return centres.gather(1, which[..., None].expand(-1, -1, d)) + noise


def random_init(b: int, n: int, m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=g)[:m] for _ in range(b)])


def assert_matches_reference(x, m, alpha, init, keys, **kw):
    res = capacity_kmeans(x, m, alpha, init_index=init, **kw)
    w = mixture_weights(res.counts, assign_experts(res.centroids, keys))
    for b in range(x.shape[0]):
        assign, centroids, sizes = reference_kmeans(x[b], m, alpha, init[b], **kw)
        assert torch.equal(res.assign[b], assign)
        assert torch.equal(res.counts[b], sizes)
        torch.testing.assert_close(res.centroids[b], centroids, rtol=0, atol=1e-10)
        assert torch.equal(w[b], reference_weights(centroids, sizes, keys))
    return res


# ---------------------------------------------------------------- capacities


@pytest.mark.parametrize(
    ("n", "m", "alpha", "expected"),
    [
        (197, 4, 1.0, [50, 49, 49, 49]),
        (197, 4, 2.0, [99, 98, 98, 98]),
        (197, 8, 1.0, [25, 25, 25, 25, 25, 24, 24, 24]),
        (197, 4, 1.2, [59, 58, 58, 58]),
        (8, 4, 1.0, [2, 2, 2, 2]),
    ],
)
def test_capacities(n, m, alpha, expected):
    cap = capacities(n, m, alpha)
    assert cap.dtype == torch.int64
    assert cap.tolist() == expected
    assert torch.equal(cap, reference_capacities(n, m, alpha))


def test_zero_total_capacity_is_rejected():
    with pytest.raises(ValueError):
        capacity_kmeans(torch.randn(1, 4, 3), 4, 0.5)


@pytest.mark.parametrize("n", [10, 26, 197])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distance_is_torch_cdist_bit_for_bit(n, dtype):
    g = torch.Generator().manual_seed(n)
    x, mu = torch.randn(3, n, 40, generator=g, dtype=dtype), torch.randn(3, 5, 40, generator=g, dtype=dtype)
    assert torch.equal(_cdist(*_pad_for_cdist(x), mu), torch.cdist(x, mu))


def test_greedy_cumsum_equals_sequential_loop():
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        n, m = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 6, (1,), generator=g))
        cost = torch.randint(0, 4, (3, n, m), generator=g).double()  # many ties in cost and preference
        cap = torch.randint(0, n + 1, (m,), generator=g)
        assign, counts = _greedy_capacity_assign(cost, cap)
        for b in range(3):
            ref = capacity_constrained_assignment(cost[b], cap)
            assert torch.equal(assign[b], ref)
            assert counts[b].tolist() == [(ref == k).sum().item() for k in range(m)]


# ---------------------------------------------------------------- k-means vs the official-style oracle


@pytest.mark.parametrize(("m", "alpha"), [(4, 1.0), (4, 2.0), (8, 1.0), (8, 2.0), (4, None), (8, None)])
def test_kmeans_matches_reference_clip_shape(m, alpha):
    x = clustered_tokens(2, 197, 768, m + 2, seed=m)
    init = random_init(2, 197, m, seed=1)
    res = assert_matches_reference(x, m, alpha, init, static_keys(m, 768, seed=3))
    if alpha is None:
        assert (res.assign >= 0).all() and (res.counts.sum(1) == 197).all()


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    n=st.integers(2, 24),
    d=st.integers(1, 6),
    m=st.integers(1, 8),
    alpha=st.sampled_from([None, 0.5, 1.0, 1.2, 2.0]),
    integer=st.booleans(),
    max_iters=st.sampled_from([1, 2, 100]),
    tol=st.sampled_from([1e-4, 0.3]),  # a loose tol stops while centroids still move (old ones returned)
    eta=st.sampled_from([1e-4, 0.5]),  # a large dual step makes λ matter
    seed=st.integers(0, 2**16),
)
def test_kmeans_matches_reference_property(b, n, d, m, alpha, integer, max_iters, tol, eta, seed):
    m = min(m, n)
    assume(alpha is None or capacities(n, m, alpha).sum() > 0)
    g = torch.Generator().manual_seed(seed)
    if integer:  # small-integer grid: exact distance ties, duplicate tokens and empty clusters
        x = torch.randint(-2, 3, (b, n, d), generator=g).double()
    else:
        x = clustered_tokens(b, n, d, 3, seed)
    keys = static_keys(m, d, seed) if m <= d else torch.randn(m, d, generator=g)
    assert_matches_reference(
        x, m, alpha, random_init(b, n, m, seed), keys, max_iters=max_iters, tol=tol, eta=eta
    )


def test_empty_cluster_takes_farthest_token():
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [9.0, 9.0]]).double()
    init = torch.tensor([[0, 1, 2]])  # clusters 0 and 1 start on the same point: cluster 1 is empty
    res = assert_matches_reference(x[None], 3, None, init, torch.eye(3, 2).double())
    assert (res.counts > 0).all()


def _batched_vs_alone(x, init, alphas=(1.0, None), exact_centroids=True):
    configs = [(a, {}) for a in alphas] + [(alphas[0], {"tol": 0.5}), (alphas[0], {"eta": 0.3})]
    for alpha, kw in configs:
        full = capacity_kmeans(x, init.shape[1], alpha, init_index=init, **kw)
        blocks = capacity_kmeans(x, init.shape[1], alpha, init_index=init, block_size=2, **kw)
        for f in ("assign", "counts", "iterations") + (("centroids",) if exact_centroids else ()):
            assert torch.equal(getattr(full, f), getattr(blocks, f)), f
        for b in range(x.shape[0]):
            one = capacity_kmeans(x[b : b + 1], init.shape[1], alpha, init_index=init[b : b + 1], **kw)
            for f in ("assign", "counts", "iterations"):
                assert torch.equal(getattr(full, f)[b], getattr(one, f)[0]), f
            if exact_centroids:
                assert torch.equal(full.centroids[b], one.centroids[0])
            else:
                torch.testing.assert_close(full.centroids[b], one.centroids[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("d", [64, 768])
def test_batched_equals_per_image(d):
    x = clustered_tokens(5, 197, d, 6, seed=d, dtype=torch.float32)
    _batched_vs_alone(x, random_init(5, 197, 4, seed=10))


def test_batched_equals_per_image_multithreaded():
    """With several BLAS threads an image's matmul may round differently for another batch size (last ulp),
    which could only matter at an exact tie: the discrete result stays equal."""
    torch.set_num_threads(_THREADS)
    try:
        x = clustered_tokens(3, 197, 768, 6, seed=9, dtype=torch.float32)
        _batched_vs_alone(x, random_init(3, 197, 4, seed=10), alphas=(1.0,), exact_centroids=False)
    finally:
        torch.set_num_threads(1)


# ---------------------------------------------------------------- keys, assignment, weights


def test_static_keys():
    keys = static_keys(8, 768, seed=42)
    assert keys.shape == (8, 768) and keys.dtype == torch.float32
    torch.testing.assert_close(keys @ keys.T, torch.eye(8), rtol=0, atol=1e-5)
    torch.manual_seed(0)
    a = static_keys(4, 768, seed=1)
    torch.manual_seed(123)
    assert torch.equal(a, static_keys(4, 768, seed=1))
    assert not torch.allclose(a, static_keys(4, 768, seed=2))


def test_assign_experts_is_optimal_permutation():
    g = torch.Generator().manual_seed(0)
    centroids, keys = torch.randn(20, 4, 16, generator=g), torch.randn(4, 16, generator=g)
    perm = assign_experts(centroids, keys)
    cos = torch.nn.functional.normalize(centroids, dim=-1) @ torch.nn.functional.normalize(keys, dim=-1).T
    for b in range(20):
        assert sorted(perm[b].tolist()) == [0, 1, 2, 3]
        assert perm[b].tolist() == linear_sum_assignment(-cos[b].numpy())[1].tolist()
        totals = {p: sum(cos[b, i, p[i]].item() for i in range(4)) for p in itertools.permutations(range(4))}
        best = max(totals, key=totals.get)
        assert perm[b].tolist() == list(best)


def test_weights_count_only_kept_tokens():
    x = clustered_tokens(6, 197, 32, 3, seed=11, dtype=torch.float32)
    res = capacity_kmeans(x, 4, 1.0, init_index=random_init(6, 197, 4, seed=12))
    for k in range(4):
        assert torch.equal(res.counts[:, k], (res.assign == k).sum(1))
    assert (res.counts <= capacities(197, 4, 1.0)).all()
    assert (res.counts.sum(1) < 197).any()  # α=1 on clustered tokens drops some
    perm = assign_experts(res.centroids, static_keys(4, 32, 0))
    w = mixture_weights(res.counts, perm)
    torch.testing.assert_close(w.sum(1), torch.ones(6))
    kept = res.counts.sum(1, keepdim=True).float()
    torch.testing.assert_close(w.gather(1, perm) * kept, res.counts.float())


# ---------------------------------------------------------------- route


def test_route_independent_of_batch():
    x = clustered_tokens(7, 197, 48, 5, seed=21, dtype=torch.float32)
    ids = torch.tensor([3, 10, 11, 500, 7, 2, 2**48 - 1])  # ids may be 48-bit path hashes
    keys = static_keys(4, 48, seed=0)
    full = route(x, keys, 1.0, image_ids=ids, seed=5)
    torch.testing.assert_close(full.sum(1), torch.ones(7))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(route(x[perm], keys, 1.0, image_ids=ids[perm], seed=5), full[perm])
    for b in range(7):
        assert torch.equal(route(x[b : b + 1], keys, 1.0, image_ids=ids[b : b + 1], seed=5)[0], full[b])
    init = init_indices(ids, 197, 4, seed=5)
    assert torch.equal(full[1], reference_route(x[1], keys, 1.0, init[1]))
    assert not torch.equal(route(x, keys, 1.0, image_ids=ids, seed=6), full)


@pytest.mark.parametrize("assignment", ["random", "greedy"])
def test_route_ablation_assignments(assignment):
    x = clustered_tokens(4, 50, 16, 3, seed=2, dtype=torch.float32)
    ids, keys = torch.arange(4), static_keys(4, 16, seed=0)
    w = route(x, keys, 1.0, image_ids=ids, seed=0, assignment=assignment)
    torch.testing.assert_close(w.sum(1), torch.ones(4))
    assert torch.equal(w, route(x, keys, 1.0, image_ids=ids, seed=0, assignment=assignment))
    hung = route(x, keys, 1.0, image_ids=ids, seed=0)
    if assignment == "random":  # same clusters, permuted experts
        assert torch.equal(w.sort(1).values, hung.sort(1).values)


def test_image_level_weights():
    g = torch.Generator().manual_seed(0)
    cls, keys = torch.randn(5, 32, generator=g), static_keys(4, 32, seed=1)
    hard = image_level_weights(cls, keys, "hard")
    assert ((hard == 0) | (hard == 1)).all() and torch.equal(hard.sum(1), torch.ones(5))
    soft = image_level_weights(cls, keys, "soft", temperature=0.1)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    assert torch.equal(soft.argmax(1), hard.argmax(1))
    assert np.all(soft.numpy() > 0)


def test_train_and_infer_runs_draw_independent_stable_inits():
    ids = torch.tensor([0, 1, 7, 2**48 - 1, 123456])
    train, infer = init_indices(ids, 197, 4, seed=5, run="train"), init_indices(ids, 197, 4, seed=5, run="infer")
    assert not (train == infer).all(1).any()  # no image shares its init between the two runs
    assert torch.equal(train, init_indices(ids, 197, 4, seed=5))  # "train" is the default
    assert torch.equal(infer, init_indices(ids, 197, 4, seed=5, run="infer"))  # deterministic
    assert torch.equal(infer[2:3], init_indices(ids[2:3], 197, 4, seed=5, run="infer"))  # per image
    assert not torch.equal(infer, init_indices(ids, 197, 4, seed=6, run="infer"))
    with pytest.raises(ValueError, match="unknown routing run"):
        init_indices(ids, 197, 4, seed=5, run="test")


def test_infer_run_matches_the_reference_with_its_own_init():
    x = clustered_tokens(5, 197, 48, 5, seed=22, dtype=torch.float32)
    ids, keys = torch.tensor([4, 8, 15, 16, 23]), static_keys(4, 48, seed=0)
    full = route(x, keys, 2.0, image_ids=ids, seed=5, run="infer")
    init = init_indices(ids, 197, 4, seed=5, run="infer")
    for b in range(5):
        assert torch.equal(full[b], reference_route(x[b], keys, 2.0, init[b]))
        assert torch.equal(route(x[b : b + 1], keys, 2.0, image_ids=ids[b : b + 1], seed=5, run="infer")[0], full[b])
    assert not torch.equal(route(x, keys, 2.0, image_ids=ids, seed=5, run="train"), full)
