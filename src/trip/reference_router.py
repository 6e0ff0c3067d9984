"""Naive, literal, one-image-at-a-time transcription of the official TRIP router (docs/method.md §3.3-§3.4).

Per-token and per-cluster Python loops on tensors (on the tokens' device), as in the official
generate_weights_multi.py. It is the oracle of tests/test_routing.py for trip.routing and the
"official-style" baseline of `trip bench`. Do not optimise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor


def reference_capacities(n: int, m: int, alpha: float) -> Tensor:
    cap = torch.full((m,), int(n // m * alpha), dtype=torch.int64)
    for k in range(n % m):
        cap[k] += 1
    return cap


def capacity_constrained_assignment(cost: Tensor, cap: Tensor) -> Tensor:
    """Visit tokens by ascending min cost; assign to the preferred cluster if it has room, else drop (-1)."""
    min_cost, pref = cost.min(dim=1)
    order = torch.sort(min_cost, stable=True).indices
    room = cap.clone()
    assign = torch.full((cost.shape[0],), -1, dtype=torch.int64, device=cost.device)
    for j in order:
        k = pref[j]
        if room[k] > 0:
            assign[j] = k
            room[k] -= 1
    return assign


def reference_kmeans(
    x: Tensor,
    m: int,
    alpha: float | None,
    init_index: Tensor,
    max_iters: int = 100,
    eta: float = 1e-4,
    tol: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    """x [N, D] -> (assign [N], centroids [M, D], sizes [M]); alpha=None is plain k-means."""
    n = x.shape[0]
    centroids = x[init_index].clone()
    lambdas = torch.zeros(m, dtype=torch.float32, device=x.device)
    cap = None if alpha is None else reference_capacities(n, m, alpha).to(x.device)
    for _ in range(max_iters):
        dist = torch.cdist(x, centroids)
        if cap is None:
            assign = dist.argmin(dim=1)
        else:
            assign = capacity_constrained_assignment(dist + lambdas, cap)
        sizes = torch.stack([(assign == k).sum() for k in range(m)])
        if cap is not None:
            lambdas += eta * (sizes - cap)
        new_centroids = torch.empty_like(centroids)
        for k in range(m):
            if sizes[k] == 0:
                farthest = torch.cdist(x, centroids).min(dim=1).values.argmax()
                new_centroids[k] = x[farthest]
                lambdas[k] = 0
            else:
                new_centroids[k] = x[assign == k].mean(dim=0)
        if torch.norm(new_centroids - centroids, dim=1).mean() < tol:
            break  # the official code returns the old centroids here
        centroids = new_centroids
    return assign, centroids, sizes


def reference_weights(centroids: Tensor, sizes: Tensor, keys: Tensor) -> Tensor:
    """Hungarian on -cosine, then w[expert of cluster k] = sizes[k] / sum(sizes)."""
    sim = F.normalize(centroids, dim=1) @ F.normalize(keys.to(centroids.dtype), dim=1).T
    _, cols = linear_sum_assignment((-sim).cpu().numpy())
    w = torch.zeros(len(sizes), dtype=torch.float32)
    total = sizes.sum()
    for k in range(len(sizes)):
        w[cols[k]] = (sizes[k].float() / total.float()).cpu()
    return w


def reference_route(x: Tensor, keys: Tensor, alpha: float | None, init_index: Tensor, **kwargs) -> Tensor:
    """One image x [N, D] -> mixture weights [M]."""
    _, centroids, sizes = reference_kmeans(x, keys.shape[0], alpha, init_index, **kwargs)
    return reference_weights(centroids, sizes, keys)
