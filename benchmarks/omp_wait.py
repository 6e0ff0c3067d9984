"""CPU time against wall time of a CPU-bound piece of trip (steps of the tiny CLIP's pretraining) under an
artificial load, with OpenMP's default wait policy and with OMP_WAIT_POLICY=PASSIVE (what trip sets).

    python benchmarks/omp_wait.py [--steps 8] [--load 2] [--repeats 2] [--json omp_wait.json]

Each measurement is a fresh process (OpenMP reads the policy when torch loads it) that draws a caption corpus
(480 images instead of 2,400: a step costs the same) and times only the training steps: wall time and the
process's CPU time (user + system). `--load` busy processes run for the whole benchmark and are stopped at its
end; the two policies alternate, so that a change in the machine's other load affects both alike. The weights
after the steps must be the same under both policies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = """
import hashlib, json, resource, sys, time
import torch
from trip import pretrain
from trip.tinyclip import new_tiny_clip

steps = int(sys.argv[1])
pretrain.RECIPE = {**pretrain.RECIPE, "steps": steps, "images": 480}  # a smaller corpus: the same steps
torch.manual_seed(0)
model = new_tiny_clip()
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
real_progress, marks = pretrain.progress, {}
def timed(steps, **kw):  # the training steps only, not drawing the corpus
    marks["wall"], marks["cpu"] = time.perf_counter(), cpu()
    yield from real_progress(steps, **kw)
    marks["wall"], marks["cpu"] = time.perf_counter() - marks["wall"], cpu() - marks["cpu"]
pretrain.progress = timed
pretrain.pretrain(model)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in model.state_dict().values())).hexdigest()[:16]
print(json.dumps({"wall_s": marks["wall"], "cpu_s": marks["cpu"], "threads": torch.get_num_threads(),
                  "weights": digest}))
"""
BUSY = "while True: pass"


def measure(policy: str | None, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    with tempfile.TemporaryDirectory(prefix="omp-wait-") as cache:
        out = subprocess.run([sys.executable, "-c", STEPS, str(steps)], env={**env, "TRIP_CACHE": cache},
                             capture_output=True, text=True, check=True).stdout
    return {"policy": policy or "default", **json.loads(out.splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--load", type=int, default=2, help="busy processes beside the measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("omp_wait.json"))
    args = parser.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.load)]
    rows = []
    try:
        for _ in range(args.repeats):
            for policy in (None, "PASSIVE"):
                rows.append({**measure(policy, args.steps), "load": os.getloadavg()[0]})
                r = rows[-1]
                print(f"{r['policy']:<8} {args.steps} steps: wall {r['wall_s']:6.1f} s, CPU {r['cpu_s']:6.1f} s "
                      f"({r['threads']} threads, load {r['load']:.1f}, weights {r['weights']})", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    args.json.write_text(json.dumps({"cpus": os.cpu_count(), "steps": args.steps, "busy": args.load,
                                     "results": rows}, indent=1))
    assert len({r["weights"] for r in rows}) == 1, "the wait policy changed the weights"


if __name__ == "__main__":
    main()
