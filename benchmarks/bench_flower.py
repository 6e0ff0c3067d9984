"""Where the Flower engine's time and memory go: the same tiny experiment in-process and on a local Flower
federation (a SuperLink, one SuperNode per source domain, their warm workers), on 127.0.0.1.

    python benchmarks/bench_flower.py [--rounds 5] [--images-per-class 4] [--method trip] [--json out.json] [--keep DIR]

Prints the per-round wall time of both engines (in-process: the round's own timer; Flower: the ServerApp's
round timer and the gaps between the round records as they reach trip), the federation's start-up time (spawn
to every worker ready, then to the first record), the run's total, and the resident memory of every process of
the federation once the run is over: RSS and, where /proc/<pid>/smaps_rollup exists, PSS (shared pages split
between the processes that map them, so PSS adds up to what the federation really holds).
Tiny backbone, synthetic data, CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from trip.config import parse_config
from trip.experiment import prepare
from trip.federation.flower.engine import FlowerRuns
from trip.federation.flower.local import LocalFederation, descendants
from trip.federation.inprocess import run_federation

TARGET = "photo"
LOAD_AT_START = os.getloadavg()[0]


def config(rounds: int, images_per_class: int, method: str) -> dict:
    methods = {"trip": {"name": "trip", "num_experts": 2, "n_ctx": 2, "kmeans_iters": 5},
               "promptfl": {"name": "promptfl", "n_ctx": 2}}
    return {"name": "bench-flower", "seeds": [0], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
            "data": {"name": "synthetic", "images_per_class": images_per_class, "targets": [TARGET]},
            "train": {"rounds": rounds, "batch_size": 8, "lr": 0.002}, "methods": [methods[method]]}


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and (where the kernel gives it) Pss of a process, in kB."""
    out = {}
    for name, key in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    out[key.rstrip(":").lower().replace("vm", "")] = int(line.split()[1])
                    break
        except OSError:
            pass
    return out


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def command(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [Path(a.decode()).name if i == 0 else a.decode() for i, a in enumerate(args) if a]
    return " ".join(words)[:90]


def federation_pids(fed: LocalFederation) -> list[tuple[str, int]]:
    named = [("superlink", fed.superlink[0]), ("workers", fed.superlink[1])]
    named += [(f"supernode{i}", procs[0]) for i, procs in enumerate(fed.nodes)]
    return [(name if j == 0 else f"  child of {name}", pid)
            for name, proc in named for j, pid in enumerate([proc.pid, *descendants(proc.pid)])]


def federation_memory(fed: LocalFederation, cpu_before: dict[int, float]) -> list[dict]:
    return [{"process": name, "pid": pid, "cmd": command(pid), "cpu_s": cpu_s(pid) - cpu_before.get(pid, 0.0),
             **memory_kb(pid)} for name, pid in federation_pids(fed)]


def workers_ready(fed: LocalFederation, timeout: float = 300.0) -> None:
    """Until every worker log says it serves its Runtime API (torch and trip imported)."""
    logs = [fed.logs / "serverapp-worker.log", *(fed.logs / f"worker{i}.log" for i in range(len(fed.nodes)))]
    deadline = time.monotonic() + timeout
    while not all(p.is_file() and "trip worker: serving" in p.read_text() for p in logs):
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after {timeout:g} s; see {fed.logs}")
        time.sleep(0.05)


def in_process(ws, seed: int) -> dict:
    start, cpu = time.perf_counter(), time.process_time()
    res = run_federation(ws.methods[0], ws.clients(TARGET, seed), ws.target(TARGET), ws.cfg.train, seed,
                         lambda _: None)
    return {"total_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
            "round_s": [r["time_s"] for r in res.history]}


def on_flower(ws, root: Path, seed: int) -> dict:
    n = len(ws.dataset.domains) - 1
    configs = [f"partition-id={i} num-partitions={n}" for i in range(n)]
    t0 = time.perf_counter()
    with LocalFederation(configs, root / "logs") as fed:
        spawned = time.perf_counter()
        workers_ready(fed)
        ready = time.perf_counter()
        arrivals: list[float] = []
        cpu_before = {pid: cpu_s(pid) for _, pid in federation_pids(fed)}
        start = time.perf_counter()
        res = FlowerRuns(fed, ws.cfg, root)(ws.methods[0], TARGET, seed, lambda _: arrivals.append(time.perf_counter()))
        end = time.perf_counter()
        memory = federation_memory(fed, cpu_before)
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return {"spawn_s": spawned - t0, "workers_ready_s": ready - t0, "first_record_s": arrivals[0] - start,
            "total_s": end - start, "round_s": [r["time_s"] for r in res.history], "arrival_gap_s": gaps,
            "memory": memory}


def report(inproc: dict, flower: dict) -> None:
    med = statistics.median
    print(f"load average {os.getloadavg()[0]:.2f} (at the start: {LOAD_AT_START:.2f}), {os.cpu_count()} CPUs")
    print("\nper round (s)      " + " ".join(f"{i:>7d}" for i in range(len(inproc["round_s"]))) + "   median")
    for name, values in (("in-process", inproc["round_s"]), ("flower (server)", flower["round_s"]),
                         ("flower (arrival)", [float("nan"), *flower["arrival_gap_s"]])):
        print(f"{name:<18} " + " ".join(f"{v:7.3f}" for v in values) + f"  {med([v for v in values if v == v]):7.3f}")
    overhead = med(flower["round_s"][1:]) - med(inproc["round_s"][1:])
    print(f"\nround overhead (median over rounds 1.., flower server - in-process): {overhead:.3f} s")
    print(f"run total: in-process {inproc['total_s']:.2f} s, flower {flower['total_s']:.2f} s "
          f"(first record after {flower['first_record_s']:.2f} s)")
    print(f"federation start: processes spawned {flower['spawn_s']:.2f} s, "
          f"workers ready {flower['workers_ready_s']:.2f} s")
    print(f"\n{'process':<28}{'pid':>8}{'RSS MB':>9}{'PSS MB':>9}{'CPU s':>8}  command")
    for row in flower["memory"]:
        print(f"{row['process']:<28}{row['pid']:>8}{row.get('rss', 0) / 1024:9.0f}{row.get('pss', 0) / 1024:9.0f}"
              f"{row['cpu_s']:8.2f}  {row['cmd']}")
    rows = flower["memory"]
    print(f"{len(rows)} processes: RSS {sum(r.get('rss', 0) for r in rows) / 1024:.0f} MB, "
          f"PSS {sum(r.get('pss', 0) for r in rows) / 1024:.0f} MB, CPU during the run "
          f"{sum(r['cpu_s'] for r in rows):.2f} s (in-process run: {inproc['cpu_s']:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--method", choices=("trip", "promptfl"), default="trip")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--keep", type=Path, help="keep the Flower logs and run folder here")
    args = parser.parse_args()
    ws = prepare(parse_config(config(args.rounds, args.images_per_class, args.method)))  # warms the feature cache
    inproc = in_process(ws, 0)
    if args.keep:
        flower = on_flower(ws, args.keep.resolve(), 0)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-flower-") as tmp:
            flower = on_flower(ws, Path(tmp), 0)
    report(inproc, flower)
    if args.json:
        args.json.write_text(json.dumps({"in_process": inproc, "flower": flower}, indent=1))


if __name__ == "__main__":
    main()
