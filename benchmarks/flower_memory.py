"""Where the memory of the local Flower federation goes: every process of `trip run --engine flower` (the
SuperLink, the trip workers that run its ServerApps and the SuperNodes' ClientApps, the SuperNodes), sampled
from /proc/<pid>/smaps_rollup while a tiny experiment runs, and what a worker's imports cost.

    python benchmarks/flower_memory.py [--rounds 3] [--json out.json]     # the federation, per process and kind
    python benchmarks/flower_memory.py --imports                          # one worker's imports, step by step

PSS splits each shared page between the processes that map it, so the PSS of all processes adds up to what the
federation holds; Pss_Anon is the memory a process made (Python objects, malloc arenas, tensors, relocated library
pages, and pages it shares copy-on-write with the process it was forked from), Pss_File the mapped files
(libraries, memory-mapped caches). The federation is sampled every 0.2 s; the table shows, per process, the
sample with the highest total PSS. Environment variables (MALLOC_ARENA_MAX, OMP_NUM_THREADS, ...) reach every
process. Tiny backbone, synthetic data, CPU; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench_flower import TARGET, config, workers_ready

from trip.config import parse_config
from trip.experiment import prepare
from trip.federation.flower.engine import FlowerRuns
from trip.federation.flower.local import LocalFederation, descendants

FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Private")  # Private: Private_Clean + Private_Dirty (USS)
# What a trip worker imports, in the order it imports it (each step adds what the previous ones did not).
WORKER_IMPORTS = ("numpy", "scipy.optimize", "scipy.stats", "torch", "torchvision", "timm", "open_clip", "flwr.app",
                  "trip.backbone", "trip.federation.flower.client_app", "trip.federation.flower.worker",
                  "trip.federation.flower.server_app")


def rollup_kb(pid: int | str) -> dict[str, int]:
    """The FIELDS of /proc/<pid>/smaps_rollup, in kB ({} once the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            key = "Private" if key.startswith("Private_") else key
            if key in FIELDS:
                out[key] = out.get(key, 0) + int(value.split()[0])
    except OSError:
        pass
    return out


def kind(pid: int) -> str:
    """What a process of the federation is, from its name (forked trip workers name themselves) or command."""
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "gone"
    if comm.startswith("trip-"):
        return comm
    for needle, name in (("flower-superlink", "superlink"), ("flower-supernode", "supernode"),
                         ("flower worker --serverapp", "serverapp worker"), ("flower worker", "trip worker"),
                         ("flower.zygote", "trip-zygote")):
        if needle in cmd:
            return name
    return f"other: {cmd[:60]}"


def tree(fed: LocalFederation) -> list[int]:
    top = [p.pid for p in [*fed.superlink, *(p for procs in fed.nodes for p in procs)]]
    return [pid for root in top for pid in [root, *descendants(root)]]


def private_by_mapping(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """A process's private memory (kB) by what it maps: [heap] (the main malloc arena), [anon] (the other
    arenas, mmapped allocations, thread stacks), and the files with the most private pages."""
    private: dict[str, int] = defaultdict(int)
    name = "?"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        head = line.split(None, 5)
        if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header: address range, perms, ...
            name = Path(head[5]).name if len(head) > 5 else "[anon]"
        elif head[0] in ("Private_Clean:", "Private_Dirty:"):
            private[name] += int(head[1])
    return sorted(private.items(), key=lambda kv: -kv[1])[:top]


class Sampler(threading.Thread):
    """Samples every process of the federation until stopped; per process the sample with the highest PSS."""

    def __init__(self, fed: LocalFederation, every: float = 0.2):
        super().__init__(daemon=True)
        self.fed, self.every, self.done = fed, every, threading.Event()
        self.peak: dict[int, dict] = {}
        self.peak_total = 0

    def run(self) -> None:
        while not self.done.is_set():
            samples = {pid: {"kind": kind(pid), **rollup_kb(pid)} for pid in tree(self.fed)}
            for pid, sample in samples.items():
                if sample.get("Pss", 0) > self.peak.get(pid, {}).get("Pss", -1):
                    self.peak[pid] = sample
            self.peak_total = max(self.peak_total, sum(s.get("Pss", 0) for s in samples.values()))
            time.sleep(self.every)


def measure(rounds: int) -> dict:
    ws = prepare(parse_config(config(rounds, 4, "trip")))  # the feature cache is warm before the federation starts
    n = len(ws.dataset.domains) - 1
    with tempfile.TemporaryDirectory(prefix="flower-memory-") as tmp, \
            LocalFederation([f"partition-id={i} num-partitions={n}" for i in range(n)], Path(tmp) / "logs") as fed:
        start = time.perf_counter()
        workers_ready(fed)
        ready = time.perf_counter() - start
        sampler = Sampler(fed)
        sampler.start()
        res = FlowerRuns(fed, ws.cfg, Path(tmp))(ws.methods[0], TARGET, 0, lambda _: None)
        sampler.done.set()
        sampler.join()
        kinds = {row["kind"].rstrip("0123456789"): pid for pid, row in sampler.peak.items()}
        mappings = {name: private_by_mapping(pid) for name, pid in kinds.items()}
    return {"workers_ready_s": ready, "round_s": [r["time_s"] for r in res.history], "processes": sampler.peak,
            "peak_total_pss_kb": sampler.peak_total, "private_by_mapping": mappings, "load": os.getloadavg()[0]}


def report(result: dict) -> None:
    mb = 1024
    print(f"{'pid':>8}  {'process':<22}" + "".join(f"{f:>10}" for f in FIELDS) + "   (MB, at the process's peak PSS)")
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for pid, row in sorted(result["processes"].items(), key=lambda kv: kv[1]["kind"]):
        by_kind[row["kind"].rstrip("0123456789")].append(row)
        print(f"{pid:>8}  {row['kind']:<22}" + "".join(f"{row.get(f, 0) / mb:10.0f}" for f in FIELDS))
    print(f"\n{'kind':<22}{'n':>3}" + "".join(f"{f:>10}" for f in FIELDS) + "   (MB, mean per process)")
    for name, rows in sorted(by_kind.items()):
        print(f"{name:<22}{len(rows):>3}" + "".join(f"{sum(r.get(f, 0) for r in rows) / len(rows) / mb:10.0f}"
                                                     for f in FIELDS))
    rows = list(result["processes"].values())
    print(f"{'total':<22}{len(rows):>3}" + "".join(f"{sum(r.get(f, 0) for r in rows) / mb:10.0f}" for f in FIELDS))
    print(f"highest PSS of the whole federation in one sample: {result['peak_total_pss_kb'] / mb:.0f} MB")
    print("\nprivate memory by mapping after the run, one process of each kind (MB):")
    for name, rows in sorted(result["private_by_mapping"].items()):
        print(f"  {name:<20} " + ", ".join(f"{m} {kb / mb:.0f}" for m, kb in rows))
    rounds = sorted(result["round_s"])
    print(f"workers ready after {result['workers_ready_s']:.1f} s; round time (ServerApp) median "
          f"{rounds[len(rounds) // 2]:.2f} s; load average {result['load']:.2f}, {os.cpu_count()} CPUs")


IMPORTS_SCRIPT = """
import importlib, json, sys, time
def rollup():
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        key, _, value = line.partition(":")
        key = "Private" if key.startswith("Private_") else key
        if key in FIELDS:
            out[key] = out.get(key, 0) + int(value.split()[0])
    return out
rows, before = [], rollup()
for name in sys.argv[1:]:
    start, n = time.perf_counter(), len(sys.modules)
    importlib.import_module(name)
    after = rollup()
    rows.append({"import": name, "s": time.perf_counter() - start, "modules": len(sys.modules) - n,
                 **{k: after[k] - before[k] for k in after}})
    before = after
print(json.dumps(rows))
""".replace("FIELDS", repr(FIELDS))


def imports() -> None:
    """A fresh interpreter imports what a worker imports, one step at a time: what each step adds."""
    out = subprocess.run([sys.executable, "-c", IMPORTS_SCRIPT, *WORKER_IMPORTS], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    print(f"{'import (adds)':<36}{'s':>6}{'modules':>9}" + "".join(f"{f:>10}" for f in FIELDS) + "   (MB)")
    rows = json.loads(out)
    for row in rows:
        print(f"{row['import']:<36}{row['s']:6.2f}{row['modules']:9d}" +
              "".join(f"{row.get(f, 0) / 1024:10.0f}" for f in FIELDS))
    print(f"{'total':<36}{sum(r['s'] for r in rows):6.2f}{sum(r['modules'] for r in rows):9d}" +
          "".join(f"{sum(r.get(f, 0) for r in rows) / 1024:10.0f}" for f in FIELDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--imports", action="store_true", help="only what a worker's imports cost")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    if args.imports:
        imports()
        return
    result = measure(args.rounds)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
