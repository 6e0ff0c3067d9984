"""Throughput of the batched router (trip.routing.route) vs the official-style per-image loop.

    python benchmarks/bench_routing.py [--device cpu|cuda] [--batch 64] [--tokens 197] [--dim 768]
                                       [--experts 4] [--naive-images 8] [--threads 1] [--repeats 7]
                                       [--blocks 8,16,32,64]

Both run the capacity k-means at capacity factor 1.0 on the same random tokens with the same per-image
inits (trip.bench.measure_routing). Rates are medians of `repeats` runs, fast and naive alternating.
--blocks also times the fast path at each of these CPU block sizes (how CPU_BLOCK_SIZE was chosen).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

import torch

from trip.bench import PRESETS, measure_routing


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--naive-images", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=7, help="median of this many runs")
    ap.add_argument("--blocks", default="", help="comma-separated CPU block sizes to compare")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = replace(PRESETS["cpu"], experts=a.experts, route_repeats=a.repeats, budget_s=float("inf"), route_batch=a.batch,
                route_tokens=a.tokens, route_dim=a.dim, route_naive_images=a.naive_images)
    dev = torch.device(a.device)
    print(f"device={a.device} threads={torch.get_num_threads()} batch={a.batch} tokens={a.tokens} dim={a.dim} "
          f"experts={a.experts} load={os.getloadavg()[0]:.2f}")
    r = measure_routing(dev, s)
    print(f"fast (batched route):        {r['fast_images_per_s']:9.1f} images/s")
    print(f"naive (official-style loop): {r['naive_images_per_s']:9.1f} images/s ({r['naive_images']} timed)")
    print(f"ratio fast/naive:            {r['ratio']:9.1f}x (naive agreement {r['naive_agreement']:.0%})")
    for block in (int(b) for b in a.blocks.split(",") if b):
        rb = measure_routing(dev, s, block_size=block)
        print(f"  block {block:3d}: fast {rb['fast_images_per_s']:8.1f} images/s, ratio {rb['ratio']:5.1f}x")
    print(f"load={os.getloadavg()[0]:.2f}")
    return r


if __name__ == "__main__":
    main()
