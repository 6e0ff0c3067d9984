"""Every speed measurement of `trip bench` in one run, printed as ratios fast / naive.

    python benchmarks/bench_all.py [--device cpu|cuda] [--out FILE.json] [--tiny]

CPU: the paper's model (random ViT-B-16), N_CTX 32 and M 4 with one image per step, in about a minute.
GPU: the paper's settings (batch 32). See docs/performance.md for the numbers and how they were taken.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from trip.bench import main as bench_main

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    raise SystemExit(bench_main(a.device, a.out, tiny=a.tiny))
