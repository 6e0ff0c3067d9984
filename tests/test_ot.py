"""trip.ot.transport_plan against a literal transcription of FedOTP's official solver, and the plan's marginals."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trip.errors import TripError
from trip.ot import partial_sinkhorn, sinkhorn, transport_plan

# ---- The official code (HongxiaLee/FedOTP trainers/GLP_OT.py, CustomCLIP), transcribed as plainly as it is
# written there; the only additions are the parameters it reads from self and the iteration count it returns.


def official_Sinkhorn(K, u, v, max_iter, thresh):
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for i in range(max_iter):  # noqa: B007 (as written there; i counts the iterations)
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        err = (r - r0).abs().mean()
        if err.item() < thresh:
            break

    T = torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K

    return T, i + 1


def official_entropic_COT_fast(a, b, M, reg, numItermax, thresh):
    dx = torch.ones_like(a)
    dy = torch.ones_like(b)

    stopThr = thresh

    K = M

    Kp = torch.matmul(torch.diag_embed(1 / a, dim1=1), K)
    Kq = torch.matmul(torch.diag_embed(1 / b, dim1=1), K.permute(0, 2, 1))

    err, cpt = 1, 0
    u = dx
    v = dy
    while cpt < numItermax:
        v0 = v
        temp = torch.div(dx, torch.matmul(Kp, v.unsqueeze(-1)).squeeze(-1))
        u = torch.minimum(temp, dx)
        v = torch.div(dy, torch.matmul(Kq, u.unsqueeze(-1)).squeeze(-1))

        cpt = cpt + 1
        err = (v - v0).abs().mean()
        if err.item() < stopThr:
            break
    Kprev = torch.matmul(torch.diag_embed(u, dim1=1), K)
    Kprev = torch.matmul(Kprev, torch.diag_embed(v, dim1=1))
    return Kprev, cpt


def official_forward_ot(sim, OT, top_percent, eps, max_iter, thresh):
    """The OT part of CustomCLIP.forward, from `sim` already permuted to [b * n_cls, M, N]."""
    M, N = sim.shape[1], sim.shape[2]
    wdist = 1.0 - sim
    xx = torch.zeros(sim.shape[0], M, dtype=sim.dtype, device=sim.device).fill_(1.0 / M)
    if OT == "Sinkhorn":
        yy = torch.zeros(sim.shape[0], N, dtype=sim.dtype, device=sim.device).fill_(1.0 / N)
    elif OT == "COT":
        top_percent = min(torch.sum(xx).item(), top_percent)
        yy = torch.zeros(sim.shape[0], N, dtype=sim.dtype, device=sim.device).fill_(1.0 / N) * top_percent

    with torch.no_grad():
        KK = torch.exp(-wdist / eps)
        if OT == "Sinkhorn":
            T, iters = official_Sinkhorn(KK, xx, yy, max_iter, thresh)
        elif OT == "COT":
            T, iters = official_entropic_COT_fast(xx, yy, KK, 0.01, max_iter, thresh)
    return T, iters


# ---- helpers


def cosines(problems: int, patches: int, prompts: int, seed: int, dim: int = 16) -> torch.Tensor:
    """Cosines of random unit vectors in a low dimension, so they spread over most of [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(problems, patches, dim, generator=g), dim=-1)
    y = torch.nn.functional.normalize(torch.randn(problems, prompts, dim, generator=g), dim=-1)
    return x @ y.transpose(1, 2)


def ours(sim, variant, gamma, eps, max_iters, tol):
    """transport_plan's answer and the iteration count of the same kernel on the same problem."""
    plan = transport_plan(sim, variant=variant, gamma=gamma, eps=eps, max_iters=max_iters, tol=tol)
    problems, patches, prompts = sim.shape
    kernel = torch.exp(-(1.0 - sim) / eps)
    a = torch.full((problems, patches), 1.0 / patches)
    b = torch.full((problems, prompts), 1.0 / prompts)
    if variant == "cot":
        same, iters = partial_sinkhorn(kernel, a, b * min(a.sum().item(), gamma), max_iters=max_iters, tol=tol)
    else:
        same, iters = sinkhorn(kernel, a, b, max_iters=max_iters, tol=tol)
    assert torch.equal(same, plan)  # the count is that of the run that made the plan
    return plan, iters


OFFICIAL_NAME = {"cot": "COT", "sinkhorn": "Sinkhorn"}


# ---- equality with the official loops

CASES = [  # (problems, M, N, seed, CLIP-like cosines 0.3 ± 0.1 or spread over [-1, 1])
    (1, 196, 2, 0, False),
    (6, 196, 2, 1, True),
    (40, 196, 2, 2, True),
    (13, 9, 3, 3, False),
    (13, 9, 3, 4, True),
]


@pytest.mark.parametrize(
    "variant, eps, gamma",
    [("cot", eps, gamma) for eps in (0.05, 0.1, 0.5) for gamma in (0.5, 0.8, 1.0)]
    + [("sinkhorn", eps, None) for eps in (0.05, 0.1, 0.5)],
)
def test_equals_official_loops(variant, eps, gamma):
    counts = []
    for problems, patches, prompts, seed, clip_like in CASES:
        sim = cosines(problems, patches, prompts, seed)
        sim = 0.3 + 0.1 * sim if clip_like else sim
        plan, iters = ours(sim, variant, gamma or 0.8, eps, 100, 1e-3)
        want, want_iters = official_forward_ot(sim, OFFICIAL_NAME[variant], gamma or 0.8, eps, 100, 1e-3)
        assert torch.equal(plan, want), (problems, patches, prompts, seed)
        assert iters == want_iters
        counts.append(iters)
    # Most settings stop early on some case. COT with gamma = 1 at eps = 0.05 does not within 100 iterations:
    # its v is large and the stopping rule is absolute.
    assert min(counts) < 100 or (variant, eps, gamma) == ("cot", 0.05, 1.0), counts


@pytest.mark.parametrize("variant", ["cot", "sinkhorn"])
@pytest.mark.parametrize("max_iters, tol", [(1, 1e-3), (4, 1e-3), (30, 0.0)])
def test_equals_official_loops_at_max_iters(variant, max_iters, tol):
    sim = cosines(8, 196, 2, seed=5)
    plan, iters = ours(sim, variant, 0.8, 0.1, max_iters, tol)
    want, want_iters = official_forward_ot(sim, OFFICIAL_NAME[variant], 0.8, 0.1, max_iters, tol)
    assert torch.equal(plan, want)
    assert iters == want_iters == max_iters


def test_stopping_rule_is_the_mean_over_the_whole_batch():
    # One slow problem among fast ones: the batch mean stops earlier than that problem alone would.
    fast = torch.full((1, 196, 2), 0.3)
    slow = cosines(1, 196, 2, seed=7)
    batch = torch.cat([fast.expand(30, -1, -1), slow])
    _, alone = ours(slow, "cot", 0.8, 0.1, 100, 1e-4)
    plan, together = ours(batch, "cot", 0.8, 0.1, 100, 1e-4)
    want, want_iters = official_forward_ot(batch, "COT", 0.8, 0.1, 100, 1e-4)
    assert together == want_iters < alone
    assert torch.equal(plan, want)


# ---- the plan's marginals


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("gamma", [0.5, 0.8, 1.0])
def test_cot_marginals(eps, gamma):
    sim = cosines(10, 196, 2, seed=11)
    plan = transport_plan(sim, variant="cot", gamma=gamma, eps=eps)
    # The last update is v = b / (K^T u), so the prompt side is exact after any iteration.
    torch.testing.assert_close(plan.sum(1), torch.full((10, 2), gamma / 2), rtol=1e-5, atol=0)
    # A patch is capped with the previous v, so the cap holds at convergence. At FedOTP's tolerance a patch
    # overshoots 1/M by under 0.1% (measured) when gamma < 1; gamma = 1 converges slowly (up to 3% after 100 steps).
    if gamma < 1:
        assert (plan.sum(2) <= 1 / 196 * 1.01).all()
    converged = transport_plan(sim, variant="cot", gamma=gamma, eps=eps, max_iters=5000, tol=1e-9)
    assert (converged.sum(2) <= 1 / 196 * (1 + 1e-5)).all()
    assert (plan >= 0).all()


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_sinkhorn_marginals(eps):
    sim = cosines(10, 196, 2, seed=12)
    plan = transport_plan(sim, variant="sinkhorn", eps=eps, max_iters=5000, tol=1e-9)
    torch.testing.assert_close(plan.sum(1), torch.full((10, 2), 0.5), rtol=1e-5, atol=0)
    torch.testing.assert_close(plan.sum(2), torch.full((10, 196), 1 / 196), rtol=1e-4, atol=0)


def test_cot_with_gamma_one_is_balanced_ot():
    sim = cosines(10, 196, 2, seed=13)
    # In fp64 the two loops reach the same fixed point to 1e-13 of the largest entry (the kernels take any dtype).
    kernel = torch.exp(-(1.0 - sim.double()) / 0.1)
    a, b = torch.full((10, 196), 1 / 196, dtype=torch.float64), torch.full((10, 2), 0.5, dtype=torch.float64)
    cot, _ = partial_sinkhorn(kernel, a, b, max_iters=20000, tol=1e-15)
    balanced, _ = sinkhorn(kernel, a, b, max_iters=20000, tol=1e-15)
    torch.testing.assert_close(cot, balanced, rtol=0, atol=1e-12 * balanced.max().item())
    # In fp32 COT stalls near it (one u per problem sits at the cap 1): 5e-5 of the largest entry is left (measured).
    cot = transport_plan(sim, variant="cot", gamma=1.0, max_iters=5000, tol=1e-9)
    balanced = transport_plan(sim, variant="sinkhorn", max_iters=5000, tol=1e-9)
    torch.testing.assert_close(cot, balanced, rtol=0, atol=1e-4 * balanced.max().item())


def test_partial_plan_fills_the_most_similar_patches():
    # One prompt receiving gamma = 1/4 of the mass: at small eps it takes the best quarter of the patches, full.
    sim = cosines(1, 196, 1, seed=14)
    plan = transport_plan(sim, variant="cot", gamma=0.25, eps=0.05, max_iters=5000, tol=1e-9)[0, :, 0]
    order = sim[0, :, 0].argsort(descending=True)
    assert plan[order[:49]].sum() > 0.85 * 0.25
    assert torch.allclose(plan[order[:20]], torch.full((20,), 1 / 196), rtol=1e-3)
    assert plan[order[98:]].sum() < 0.01 * 0.25


@settings(max_examples=25, deadline=None)
@given(
    problems=st.integers(1, 5),
    patches=st.integers(1, 30),
    prompts=st.integers(1, 4),
    gamma=st.floats(0.05, 1.0),
    eps=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_marginal_properties(problems, patches, prompts, gamma, eps, seed):
    sim = cosines(problems, patches, prompts, seed)
    for variant, mass in (("cot", gamma), ("sinkhorn", 1.0)):
        plan = transport_plan(sim, variant=variant, gamma=gamma, eps=eps, max_iters=3000, tol=1e-10)
        assert plan.shape == sim.shape and (plan >= 0).all()
        torch.testing.assert_close(plan.sum(1), torch.full((problems, prompts), mass / prompts), rtol=1e-4, atol=0)
        assert (plan.sum(2) <= (1 + 1e-3) / patches).all()


# ---- precision and gradients


def test_fp16_input_gives_the_fp32_answer_where_the_official_fp16_kernel_fails():
    sim = (0.3 + 0.1 * cosines(4, 196, 2, seed=15)).half()  # CLIP-like image-text cosines, in CLIP's fp16
    for variant in ("cot", "sinkhorn"):
        plan = transport_plan(sim, variant=variant)
        assert plan.dtype == torch.float32 and torch.isfinite(plan).all()
        assert torch.equal(plan, transport_plan(sim.float(), variant=variant))
        assert torch.isfinite(transport_plan(sim, variant=variant, eps=0.01)).all()
    # The official code at the few-shot script's eps = 0.01 in fp16: K underflows to 0 and the plan is NaN.
    official, _ = official_forward_ot(sim, "COT", 0.8, 0.01, 100, 1e-3)
    assert torch.isnan(official).any()


def test_no_gradient_flows_through_the_plan():
    sim = cosines(3, 196, 2, seed=16).requires_grad_()
    plan = transport_plan(sim)
    assert not plan.requires_grad
    (plan * sim).sum().backward()
    assert torch.equal(sim.grad, plan)  # d/dsim of sum(T * sim) is T alone: T is a constant


# ---- errors


@pytest.mark.parametrize("variant, bad_row", [("sinkhorn", True), ("cot", False)])
def test_underflow_at_small_eps_is_a_clear_error(variant, bad_row):
    sim = torch.full((2, 196, 2), 0.3)
    if bad_row:  # one patch far from both prompts: its row of K is 0
        sim[1, 5, :] = -0.5
    else:  # one prompt far from every patch: its column of K is 0
        sim[1, :, 1] = -0.5
    assert torch.isfinite(transport_plan(sim, variant=variant, eps=0.1)).all()
    with pytest.raises(TripError, match=r"eps=0\.01.*underflows.*lowest cos here is -0\.5.*larger eps"):
        transport_plan(sim, variant=variant, eps=0.01)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"variant": "COT"}, "unknown optimal transport variant 'COT'; use one of cot, sinkhorn"),
        ({"gamma": 0.0}, r"gamma .* must be in \(0, 1\], got 0.0"),
        ({"gamma": 1.5}, r"gamma .* must be in \(0, 1\], got 1.5"),
        ({"eps": 0.0}, "eps .* must be > 0, got 0.0"),
        ({"max_iters": 0}, "max_iters must be an integer >= 1, got 0"),
        ({"max_iters": 2.5}, "max_iters must be an integer >= 1, got 2.5"),
        ({"tol": -1e-3}, "tol must be >= 0, got -0.001"),
        ({"tol": float("nan")}, "tol must be >= 0, got nan"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(TripError, match=match):
        transport_plan(cosines(2, 9, 2, seed=0), **kwargs)


@pytest.mark.parametrize(
    "sim, match",
    [
        (torch.zeros(9, 2), r"\[problems, patches, prompts\].*shape \(9, 2\)"),
        (torch.zeros(0, 9, 2), r"no empty dimension, got torch.float32 of shape \(0, 9, 2\)"),
        (torch.zeros(1, 9, 2, dtype=torch.int64), "floating-point.*torch.int64"),
        (torch.full((1, 9, 2), float("nan")), "NaN or infinite"),
    ],
)
def test_bad_similarities(sim, match):
    with pytest.raises(TripError, match=match):
        transport_plan(sim)
