"""Wall-clock per round of the three engines (in-process, `flower`, `flower-sim`) at about 20 and 100 clients.

    python benchmarks/engine_rounds.py [--clients-per-domain 7 33] [--rounds 3] [--json engine_rounds.json]

The synthetic data set has four domains; with `photo` held out there are three source domains, so 7 and 33
clients per domain give 21 and 99 clients. Every client takes part in every round (fraction 1, no drops), PromptFL
with 2 context tokens on the tiny CLIP (random weights), 72 images per domain split half and half into train and
validation (a client of 99 holds about 2), CPU. A round's time is the round's own timer (the
`time_s` of its record: training every client, aggregating, evaluating every client's validation split and the
held-out domain), the median over the rounds after the first (the first is a warm-up: under `flower-sim` it also
holds ray's start and the actors' imports); the run's total (submit to result) is beside it. Load averages are
recorded before and after each measurement: on a shared machine the numbers move with the load.

OMP_WAIT_POLICY=PASSIVE is set (unless set already) before torch is imported, as the Flower engines set it for
their processes: on an overloaded machine OpenMP threads that spin while waiting make the in-process engine's
rounds tens of times slower (at load 21 on 2 cores: 27.5 s instead of 0.65 s per round at 21 clients), which would
measure the wait policy, not the engine. It changes no number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from trip.shared_cores import share_the_cores

TARGET, SEED = "photo", 0
ENGINES = ("inprocess", "flower", "flower-sim")


def config(clients_per_domain: int, rounds: int) -> dict:
    return {"name": "engine-rounds", "seeds": [SEED], "device": "cpu",
            "backbone": {"name": "tiny", "pretrained": None},
            "data": {"name": "synthetic", "images_per_class": 12, "targets": [TARGET], "val_fraction": 0.5},
            "train": {"rounds": rounds, "batch_size": 8, "lr": 0.002},
            "federation": {"clients_per_domain": clients_per_domain, "min_client_size": 2},
            "methods": [{"name": "promptfl", "n_ctx": 2}]}


def round_times(ws, engine: str, root: Path) -> list[float]:
    from trip.federation.flower.engine import flower_federation, simulation_federation
    from trip.federation.inprocess import run_federation

    method = ws.methods[0]
    if engine == "inprocess":
        res = run_federation(method, ws.clients(TARGET, SEED), ws.target(TARGET), ws.cfg.train, SEED, lambda _: None)
    else:
        federation = flower_federation if engine == "flower" else simulation_federation
        with federation(ws, root) as federate:
            res = federate(method, TARGET, SEED, lambda _: None)
    return [r["time_s"] for r in res.history]


def measure(ws, engine: str) -> dict:
    load_before = os.getloadavg()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="engine-rounds-") as tmp:
        rounds = round_times(ws, engine, Path(tmp))
    total = time.perf_counter() - start
    return {"engine": engine, "round_s": rounds, "median_round_s": statistics.median(rounds[1:]),
            "total_s": round(total, 2), "load_before": load_before, "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients-per-domain", type=int, nargs="+", default=[7, 33])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--json", type=Path, default=Path("engine_rounds.json"))
    args = parser.parse_args()
    share_the_cores()  # before torch is imported (see above)
    from trip.config import parse_config
    from trip.experiment import prepare

    results = []
    for k in args.clients_per_domain:
        ws = prepare(parse_config(config(k, args.rounds)))
        for engine in args.engines:
            row = {"clients": len(ws.clients(TARGET, SEED)), **measure(ws, engine)}
            results.append(row)
            print(f"{row['clients']:>4} clients  {engine:<11} median round {row['median_round_s']:7.2f} s  "
                  f"(rounds {', '.join(f'{t:.2f}' for t in row['round_s'])}; run {row['total_s']:.1f} s; load "
                  f"{row['load_before'][0]:.1f} -> {row['load_after'][0]:.1f})", flush=True)
            args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rounds": args.rounds, "results": results,
                                             "omp_wait_policy": os.environ["OMP_WAIT_POLICY"]}, indent=1))


if __name__ == "__main__":
    main()
