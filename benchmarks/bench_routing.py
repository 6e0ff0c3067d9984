"""Throughput of the batched router (trip.routing.route) vs the official-style per-image loop.

    python benchmarks/bench_routing.py [--device cpu|cuda] [--batch 64] [--tokens 197] [--dim 768]
                                       [--experts 4] [--naive-images 8] [--threads T] [--repeats 3]

Both run the capacity k-means at capacity factor 1.0 on the same random tokens with the same per-image inits.
Each timing is the best of `repeats` runs (per image for the naive loop): shared machines only add noise.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "src", _ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from reference_router import reference_route  # noqa: E402

from trip.routing import init_indices, route, static_keys  # noqa: E402

CAPACITY_FACTOR = 1.0
SEED = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of(repeats: int, device: torch.device, fn: Callable[[], Tensor]) -> tuple[Tensor, float]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return out, best


def measure_routing(
    device: str = "cpu",
    batch: int = 64,
    tokens: int = 197,
    dim: int = 768,
    experts: int = 4,
    naive_images: int = 8,
    threads: int | None = None,
    repeats: int = 3,
) -> dict:
    """Images/s of the batched router and of the per-image official-style loop (timed on naive_images).

    threads sets torch's CPU thread count for the measurement only (None: leave it).
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(torch.device(device), batch, tokens, dim, experts, naive_images, repeats)
    finally:
        torch.set_num_threads(previous)


def _measure(
    dev: torch.device, batch: int, tokens: int, dim: int, experts: int, naive: int, repeats: int
) -> dict:
    x = torch.randn(batch, tokens, dim, generator=torch.Generator().manual_seed(SEED)).to(dev)
    keys = static_keys(experts, dim, seed=SEED).to(dev)
    ids = torch.arange(batch)

    route(x[:2], keys, CAPACITY_FACTOR, image_ids=ids[:2], seed=SEED)  # warm-up (allocator, kernels)
    fast, fast_s = _best_of(repeats, dev, lambda: route(x, keys, CAPACITY_FACTOR, image_ids=ids, seed=SEED))

    n_naive = min(naive, batch)
    init = init_indices(ids[:n_naive], tokens, experts, seed=SEED)
    naive, naive_s = [], 0.0
    for b in range(n_naive):
        w, s = _best_of(repeats, dev, lambda b=b: reference_route(x[b], keys, CAPACITY_FACTOR, init[b]))
        naive.append(w)
        naive_s += s

    agree = sum(torch.equal(fast[b].cpu(), naive[b].cpu()) for b in range(n_naive))
    fast_ips, naive_ips = batch / fast_s, n_naive / naive_s
    return {
        "device": str(dev),
        "batch": batch,
        "tokens": tokens,
        "dim": dim,
        "experts": experts,
        "naive_images": n_naive,
        "capacity_factor": CAPACITY_FACTOR,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "fast_images_per_s": fast_ips,
        "naive_images_per_s": naive_ips,
        "ratio": fast_ips / naive_ips,
        "naive_agreement": agree / n_naive,  # fraction of timed images with bit-equal weights
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--naive-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    a = ap.parse_args(argv)
    r = measure_routing(a.device, a.batch, a.tokens, a.dim, a.experts, a.naive_images, a.threads, a.repeats)
    print(", ".join(f"{k}={r[k]}" for k in ("device", "threads", "batch", "tokens", "dim", "experts")))
    print(f"fast (batched route):        {r['fast_images_per_s']:9.1f} images/s")
    print(f"naive (official-style loop): {r['naive_images_per_s']:9.1f} images/s ({r['naive_images']} timed)")
    print(f"ratio fast/naive:            {r['ratio']:9.1f}x (naive agreement {r['naive_agreement']:.0%})")
    return r


if __name__ == "__main__":
    main()
