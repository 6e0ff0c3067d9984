"""Parameter-free token-level router of TRIP (docs/method.md §3): capacity k-means + Hungarian matching to static keys.

Everything is batched over images ([B, N, D] tokens) and runs on CPU or GPU. Each image's result depends
only on its own tokens and init indices, never on the rest of the batch: bit for bit where the BLAS rounds
an image's matmul the same whatever the batch size (e.g. single-threaded CPU); otherwise distances can
differ in the last ulp, which changes a result only at an exact tie.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "KMeansResult",
    "assign_experts",
    "capacities",
    "capacity_kmeans",
    "image_level_weights",
    "init_indices",
    "mixture_weights",
    "route",
    "static_keys",
]

RUNS = ("train", "infer")  # the two routing runs of an image, each with its own k-means init (docs/method.md §3.1)
CPU_BLOCK_SIZE = 32  # images per k-means block on CPU, by measurement (benchmarks/bench_routing.py --blocks)


@dataclass(frozen=True)
class KMeansResult:
    assign: Tensor  # [B, N] int64 cluster id, -1 for a dropped token
    centroids: Tensor  # [B, M, D]
    counts: Tensor  # [B, M] int64 kept tokens per cluster
    iterations: Tensor  # [B] int64 iterations run (the converged one included)


def static_keys(num_experts: int, dim: int, seed: int) -> Tensor:
    """[M, D] fp32 orthonormal rows from a private generator (sign-fixed QR of a Gaussian)."""
    if num_experts > dim:
        raise ValueError(f"cannot have {num_experts} orthonormal rows in dimension {dim}")
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, num_experts, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # q [D, M]
    sign = torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(torch.float64)
    return (q * sign).T.contiguous().to(torch.float32)


def capacities(num_tokens: int, num_clusters: int, capacity_factor: float) -> Tensor:
    """c_m = int(floor(N/M)·α), +1 (unscaled) for the first N mod M clusters (docs/reproduce.md B11)."""
    cap = torch.full((num_clusters,), int(num_tokens // num_clusters * capacity_factor), dtype=torch.int64)
    cap[: num_tokens % num_clusters] += 1
    return cap


def _group_order(pref: Tensor, best: Tensor, num_clusters: int) -> Tensor:
    """[B, N] token indices sorted by (preferred cluster, cost, token index): the greedy's visiting order
    (a stable sort by cost), grouped by preferred cluster. For fp32 on CPU, one NumPy (SIMD) sort of unique
    int64 keys (cluster | order-preserving bits of the cost | index), several times faster than two
    stable sorts. The costs are free of NaN."""
    n = best.shape[1]
    if best.device.type != "cpu" or best.dtype != torch.float32 or n >= 2**16 or num_clusters >= 2**15:
        order = torch.argsort(best, dim=1, stable=True)
        return order.gather(1, torch.argsort(pref.gather(1, order), dim=1, stable=True))
    bits = (best.numpy() + np.float32(0)).view(np.int32)  # + 0 maps -0.0 to +0.0: they compare equal
    monotone = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).astype(np.int64) + 2**31  # in [0, 2^32), ordered as best
    key = (pref.numpy() << 48) | (monotone << 16) | np.arange(n)
    key.sort(axis=1)
    return torch.from_numpy(key & 0xFFFF)


def _greedy_capacity_assign(cost: Tensor, cap: Tensor | None) -> tuple[Tensor, Tensor]:
    """Preferred cluster per token, dropping overflow greedily in ascending-cost order. -> assign, counts.

    The greedy loop visits tokens by ascending cost (stable) and keeps a token iff its preferred cluster
    p still has room. Dropped tokens consume no room and a token is only dropped once p is full, so the
    kept tokens of p are exactly the first c_p tokens preferring p in that order: the ones whose rank
    among the tokens preferring p (sorted by cost, then index) is below c_p."""
    b, n, num_clusters = cost.shape
    best, pref = cost.min(dim=-1)  # [B, N]; ties -> first index
    wanted = torch.zeros(b, num_clusters, dtype=torch.int64, device=cost.device)
    wanted.scatter_add_(1, pref, torch.ones_like(pref))  # [B, M] tokens preferring each cluster
    if cap is None:
        return pref, wanted
    order = _group_order(pref, best, num_clusters)
    pref_sorted = pref.gather(1, order)
    start = wanted.cumsum(1) - wanted  # [B, M] first position of each cluster's group in `order`
    rank = torch.arange(n, device=cost.device) - start.gather(1, pref_sorted)
    assign = torch.empty_like(pref).scatter_(1, order, torch.where(rank < cap[pref_sorted], pref_sorted, -1))
    return assign, torch.minimum(wanted, cap)


def _pad_for_cdist(x: Tensor, out: Tensor | None = None) -> tuple[Tensor, bool]:
    """x [B, N, D] -> ([B, N, D+2] = (-2x, |x|², 1), True): torch.cdist's left matmul operand, built once
    instead of at every iteration, in `out` when given; (copy of x, False) when N <= 25 (so M <= 25), where
    torch.cdist is direct. Always a fresh buffer: the k-means moves images around in it."""
    if x.shape[1] <= 25:
        return x.clone(), False
    d = x.shape[-1]
    lhs = x.new_empty(*x.shape[:-1], d + 2) if out is None else out
    lhs[..., d + 1] = 1
    # One image at a time on CPU: its second pass (x²) reads it from cache.
    step = 1 if x.device.type == "cpu" else max(1, len(x))
    for xc, lc in zip(x.split(step), lhs.split(step), strict=True):
        torch.mul(xc, -2, out=lc[..., :d])
        torch.sum(xc.pow(2), dim=-1, out=lc[..., d])  # torch.cdist's |x|², bit for bit
    return lhs, True


def _cdist(xs: Tensor, padded: bool, mu: Tensor) -> Tensor:
    """torch.cdist(x, mu) bit for bit ([B, N, M], Euclidean), from xs = _pad_for_cdist(x)."""
    if not padded:
        return torch.cdist(xs, mu)
    mu_rhs = torch.cat([mu, torch.ones_like(mu[..., :1]), mu.pow(2).sum(-1, keepdim=True)], -1)
    return (xs @ mu_rhs.mT).clamp_min_(1e-30).sqrt_()


def _update_centroids(
    xs: Tensor, padded: bool, dist: Tensor, assign: Tensor, counts: Tensor, clusters: Tensor
) -> tuple[Tensor, Tensor | None]:
    """Mean of kept tokens; an empty cluster takes the token farthest from the old centroids.
    -> mu, empty ([B, M] bool; None when known to have no empty cluster, checked on CPU only: a sync)."""
    d = xs.shape[-1] - 2 if padded else xs.shape[-1]
    # Padded: use the -2x block and scale by -0.5. Scaling by a power of two commutes with rounding, so this
    # equals the mean of x bit for bit, and only one copy of the tokens is kept.
    feats, scale = xs[..., :d], (-0.5 if padded else 1.0)
    member = (assign.unsqueeze(1) == clusters[:, None]).to(xs.dtype)  # [B, M, N]; dropped tokens in none
    mu = (member @ feats) * scale / counts.clamp_min(1).unsqueeze(-1).to(xs.dtype)
    empty = counts == 0
    if xs.device.type == "cpu" and not bool(empty.any()):
        return mu, None
    far = dist.amin(dim=-1).argmax(dim=1)  # [B]; two empty clusters get the same token
    far_x = feats.gather(1, far[:, None, None].expand(-1, 1, d)) * scale  # [B, 1, D]
    return torch.where(empty.unsqueeze(-1), far_x, mu), empty


@dataclass
class _Outputs:
    """Results of a block, written image by image as each one converges."""

    assign: Tensor  # [B, N]
    counts: Tensor  # [B, M]
    centroids: Tensor  # [B, M, D]
    iterations: Tensor  # [B]

    @classmethod
    def empty(cls, x: Tensor, m: int) -> _Outputs:
        b, n, d = x.shape
        i64 = {"dtype": torch.int64, "device": x.device}
        return cls(torch.empty(b, n, **i64), torch.empty(b, m, **i64), x.new_empty(b, m, d), torch.empty(b, **i64))

    def record(self, images: Tensor, rows: Tensor, assign: Tensor, counts: Tensor, mu: Tensor, it: int) -> None:
        """images[i] = image id of working row rows[i] (a bool mask or indices)."""
        self.assign[images] = assign[rows]
        self.counts[images] = counts[rows]
        self.centroids[images] = mu[rows]
        self.iterations[images] = it


def _compact(done: Tensor, xs: Tensor) -> Tensor:
    """Move the live images at the tail of xs into the rows of the done ones, so that the live images are
    the prefix xs[:n_live] and converged images cost nothing. -> order [n_live]: old row of each new row."""
    n_live = done.numel() - int(done.sum())
    holes = done[:n_live].nonzero().squeeze(1)
    src = (~done[n_live:]).nonzero().squeeze(1) + n_live
    for h, i in zip(holes.tolist(), src.tolist(), strict=True):  # on CPU faster than one indexed copy
        xs[h].copy_(xs[i])
    order = torch.arange(n_live, device=done.device)
    order[holes] = src
    return order


def _kmeans_block(
    x: Tensor, init_index: Tensor, cap: Tensor | None, max_iters: int, eta: float, tol: float,
    buf: Tensor | None = None,
) -> KMeansResult:
    """capacity_kmeans on one block of images, x [B, N, D] in the compute dtype (buf: scratch for the
    padded tokens). The live images are the first rows of the working set: a converged image leaves it
    at once (its tokens are overwritten by a live one), so it costs nothing in later iterations."""
    b, _, d = x.shape
    m, dev = init_index.shape[1], x.device
    clusters = torch.arange(m, device=dev)
    out = _Outputs.empty(x, m)
    image = torch.arange(b, device=dev)  # image id of each working row
    mu = x.gather(1, init_index.unsqueeze(-1).expand(-1, -1, d))
    xs, padded = _pad_for_cdist(x, buf)
    lam = torch.zeros(b, m, dtype=torch.float32, device=dev)
    prev = None  # the assignment the current centroids were computed from
    for it in range(1, max_iters + 1):
        dist = _cdist(xs[: len(image)], padded, mu)  # [b', N, M]
        assign, counts = _greedy_capacity_assign(dist if cap is None else dist + lam.unsqueeze(1), cap)
        if cap is not None:
            lam = lam + eta * (counts - cap)
        if prev is not None and tol > 0:
            # The same tokens as last time and no empty cluster: the new centroids would equal mu bit for
            # bit (converged), so these images stop here without a centroid step.
            same = (assign == prev).all(-1) & (counts > 0).all(-1)
            if bool(same.any()):
                out.record(image[same], same, assign, counts, mu, it)
                if bool(same.all()):
                    break
                order = _compact(same, xs)
                image, mu, lam, dist, assign, counts = (t[order] for t in (image, mu, lam, dist, assign, counts))
        new_mu, empty = _update_centroids(xs[: len(image)], padded, dist, assign, counts, clusters)
        if empty is not None:
            lam = lam.masked_fill(empty, 0.0)
        converged = torch.linalg.vector_norm(new_mu - mu, dim=-1).mean(-1) < tol
        if it == max_iters:
            out.record(image, slice(None), assign, counts, torch.where(converged[:, None, None], mu, new_mu), it)
            break
        if bool(converged.any()):
            out.record(image[converged], converged, assign, counts, mu, it)  # the old centroids, as official
            if bool(converged.all()):
                break
            order = _compact(converged, xs)
            image, new_mu, lam, assign = image[order], new_mu[order], lam[order], assign[order]
        mu, prev = new_mu, assign
    return KMeansResult(out.assign, out.centroids, out.counts, out.iterations)


def capacity_kmeans(
    tokens: Tensor,
    num_clusters: int,
    capacity_factor: float | None,
    *,
    init_index: Tensor | None = None,
    generator: torch.Generator | None = None,
    max_iters: int = 100,
    eta: float = 1e-4,
    tol: float = 1e-4,
    block_size: int | None = None,
) -> KMeansResult:
    """Official capacity-aware k-means (docs/method.md §3.3) on tokens [B, N, D]; capacity_factor=None is plain k-means.

    init_index [B, M] holds token indices of the initial centroids (default: randperm(N)[:M] per image from
    `generator`). Runs in at least fp32. Every operation is per image and an image's result is frozen when it
    converges, so it equals the result of the image alone. On convergence the old centroids are returned.
    Images are processed block_size at a time (default: CPU_BLOCK_SIZE on CPU, whose padded tokens stay in
    cache; all at once on GPU), and an image leaves its block's working set as soon as it converges.
    """
    b, n, _ = tokens.shape
    if n < num_clusters:
        raise ValueError(f"{n} tokens cannot make {num_clusters} clusters")
    if max_iters < 1:
        raise ValueError(f"max_iters must be at least 1, got {max_iters}")
    x = tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    if init_index is None:
        init_index = torch.stack([torch.randperm(n, generator=generator)[:num_clusters] for _ in range(b)])
    init_index = init_index.to(x.device, torch.int64)
    cap = None if capacity_factor is None else capacities(n, num_clusters, capacity_factor).to(x.device)
    if cap is not None and int(cap.sum()) == 0:
        raise ValueError(f"capacity factor {capacity_factor} leaves no room for any of the {n} tokens")
    block = block_size or (CPU_BLOCK_SIZE if x.device.type == "cpu" else max(1, b))
    buf = x.new_empty(min(block, b), n, x.shape[-1] + 2) if n > 25 else None  # reused by every block
    parts = [
        _kmeans_block(xb, ib, cap, max_iters, eta, tol, None if buf is None else buf[: len(xb)])
        for xb, ib in zip(x.split(block), init_index.split(block), strict=True)
    ]
    if len(parts) == 1:
        return parts[0]
    return KMeansResult(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(KMeansResult)))


def _cosine(centroids: Tensor, keys: Tensor) -> Tensor:
    """centroids [B, M, D], keys [E, D] -> [B, M, E] cosine, in at least fp32.

    One small matmul per image: a batched matmul may round differently for different batch sizes, which
    could flip the Hungarian choice between exactly tied clusters (duplicate centroids).
    """
    dt = torch.promote_types(torch.promote_types(centroids.dtype, keys.dtype), torch.float32)
    keys_t = F.normalize(keys.to(device=centroids.device, dtype=dt), dim=-1).T
    return torch.stack([F.normalize(c, dim=-1) @ keys_t for c in centroids.to(dt)])


def assign_experts(centroids: Tensor, keys: Tensor) -> Tensor:
    """perm[b, m] = expert of cluster m: Hungarian bijection maximising the total cosine (scipy, on CPU)."""
    cost = (-_cosine(centroids, keys)).cpu().numpy()
    perm = np.stack([linear_sum_assignment(c)[1] for c in cost])  # row indices are 0..M-1 (square)
    return torch.as_tensor(perm, dtype=torch.int64, device=centroids.device)


def mixture_weights(counts: Tensor, perm: Tensor) -> Tensor:
    """w[b, perm[b, m]] += counts[b, m] / Σ_m counts[b, m] (kept tokens only; collisions are summed)."""
    w = torch.zeros(counts.shape, dtype=torch.float32, device=counts.device)
    w.scatter_add_(1, perm, counts.to(torch.float32))
    return w / counts.sum(1, keepdim=True).clamp_min(1).to(torch.float32)


def _image_generators(image_ids: Tensor, seed: int, run: str) -> list[torch.Generator]:
    """One generator per image and run, seeded by a hash of (seed, image id, run): the two runs of an image
    draw independent inits, as the official router's two successive randperm calls do."""
    if run not in RUNS:
        raise ValueError(f"unknown routing run {run!r}; expected one of {RUNS}")
    return [torch.Generator().manual_seed(_run_seed(seed, i, run)) for i in image_ids.tolist()]


def _run_seed(seed: int, image_id: int, run: str) -> int:
    text = f"{seed}/{image_id}/{run}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def _draw_init(gens: list[torch.Generator], num_tokens: int, num_clusters: int) -> Tensor:
    return torch.stack([torch.randperm(num_tokens, generator=g)[:num_clusters] for g in gens])


def init_indices(image_ids: Tensor, num_tokens: int, num_clusters: int, seed: int, run: str = "train") -> Tensor:
    """[B, M] k-means init of each image in one run: randperm(N)[:M] from that image's and run's generator."""
    return _draw_init(_image_generators(image_ids, seed, run), num_tokens, num_clusters)


@dataclass
class Routing:
    weights: Tensor  # [B, M] fp32 mixture weights (rows sum to 1)
    token_experts: Tensor  # [B, N] expert of each token, -1 where the token was dropped


def route_tokens(
    tokens: Tensor,
    keys: Tensor,
    capacity_factor: float | None,
    *,
    image_ids: Tensor,
    seed: int,
    run: str = "train",
    assignment: Literal["hungarian", "random", "greedy"] = "hungarian",
    **kmeans_kwargs,
) -> Routing:
    """Full router: tokens [B, N, D], keys [M, D] -> mixture weights and the expert of every token.

    `run` ("train" or "infer", the capacity run) picks the k-means init: each image draws an independent one
    per run. "random" draws randperm(M) from each image's generator right after its init draw; "greedy" sends each
    cluster to its argmax-cosine key (collisions allowed, weights summed per expert).
    """
    if assignment not in ("hungarian", "random", "greedy"):
        raise ValueError(f"unknown assignment {assignment!r}")
    num_experts, n = keys.shape[0], tokens.shape[1]
    if tokens.shape[0] == 0:
        return Routing(torch.zeros(0, num_experts, dtype=torch.float32, device=tokens.device),
                       torch.zeros(0, n, dtype=torch.int64, device=tokens.device))
    gens = _image_generators(image_ids, seed, run)
    init = _draw_init(gens, n, num_experts)
    res = capacity_kmeans(tokens, num_experts, capacity_factor, init_index=init, **kmeans_kwargs)
    if assignment == "hungarian":
        perm = assign_experts(res.centroids, keys)
    elif assignment == "greedy":
        perm = _cosine(res.centroids, keys).argmax(-1)
    else:
        perm = torch.stack([torch.randperm(num_experts, generator=g) for g in gens]).to(tokens.device)
    experts = perm.gather(1, res.assign.clamp_min(0)).masked_fill(res.assign < 0, -1)
    return Routing(mixture_weights(res.counts, perm), experts)


def route(tokens: Tensor, keys: Tensor, capacity_factor: float | None, **kwargs) -> Tensor:
    """The mixture weights [B, M] of `route_tokens` (same arguments)."""
    return route_tokens(tokens, keys, capacity_factor, **kwargs).weights


def image_level_weights(
    cls_tokens: Tensor, keys: Tensor, mode: Literal["hard", "soft"], temperature: float = 0.1
) -> Tensor:
    """Image-level routing ablation: cls_tokens [B, D] -> [B, M]: one-hot argmax cos, or softmax(cos/τ)."""
    cos = _cosine(cls_tokens.unsqueeze(1), keys).squeeze(1)  # [B, M]
    if mode == "hard":
        return F.one_hot(cos.argmax(-1), keys.shape[0]).to(torch.float32)
    if mode == "soft":
        return torch.softmax(cos / temperature, dim=-1).to(torch.float32)
    raise ValueError(f"unknown mode {mode!r}")
