"""The trip workers of the local federation, forked from one process that imported their code once.

A trip worker's memory is almost all runtime: torch, torchvision, timm, open_clip, scipy, flwr and trip come to
~520 MB of Python objects, relocated library pages and C++ registries per process, while the tiny CLIP with a
domain's frozen features is ~45 MB (docs/performance.md, Flower). Here one process imports all of it and forks
the ServerApp's worker and the SuperNodes' workers: they share those pages copy-on-write, and each holds privately
only what it changes afterwards (its backbone and features, its tasks' objects).

    python -m trip.federation.flower.zygote --logs DIR [--root-certificates CA] [--serverapp API]
                                            [--clientapp NAME=API ...]

Forking is safe because nothing has run yet: no torch thread pool exists before the fork (torch starts its
OpenMP threads at the first parallel operation, in each worker), OpenBLAS stops its threads around a fork itself,
and no connection is open. Every worker is killed by the kernel when this process ends (as every process trip
starts is, docs/architecture.md), so the local federation stops them by stopping this one. This process ends
when the ServerApp's worker does; a SuperNode's worker that ends is reaped and logged."""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path

PR_SET_NAME = 15  # linux/prctl.h: the name `ps` and /proc/<pid>/comm show (15 bytes)
SERVERAPP = "serverapp-worker"  # the name (and log) of the ServerApp's worker


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m trip.federation.flower.zygote", description=__doc__)
    parser.add_argument("--logs", type=Path, required=True, help="each worker writes DIR/<name>.log")
    parser.add_argument("--root-certificates", default=None,
                        help="CA of the SuperLink's TLS Runtime API (a SuperNode's is local and plain)")
    parser.add_argument("--serverapp", metavar="API", help=f"the SuperLink's Runtime API (its worker: {SERVERAPP})")
    parser.add_argument("--clientapp", action="append", default=[], metavar="NAME=API",
                        help="a SuperNode's Runtime API and its worker's name, e.g. worker0=127.0.0.1:9094")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    workers = [(SERVERAPP, args.serverapp)] if args.serverapp else []
    workers += [tuple(spec.split("=", 1)) for spec in args.clientapp]
    import trip.federation.flower.client_app  # noqa: F401 - what every worker runs: imported once, shared
    import trip.federation.flower.server_app  # noqa: F401
    from trip.federation.flower.local import death_signal
    from trip.federation.flower.worker import serve

    gc.collect()
    gc.freeze()  # the collector never visits (and so never writes to) the shared objects in a worker
    sys.stdout.flush()
    sys.stderr.flush()
    arm = death_signal(os.getpid())
    children = {}
    for name, api in workers:
        pid = os.fork()
        if pid == 0:
            ca = args.root_certificates if name == SERVERAPP else None
            _worker(partial(serve, api, ca, serverapp=name == SERVERAPP), name, args.logs, arm)
        children[pid] = name
        print(f"forked {name} (pid {pid}) for the Runtime API at {api}", flush=True)
    while children:
        pid, status = os.wait()
        name, code = children.pop(pid), os.waitstatus_to_exitcode(status)
        print(f"{name} (pid {pid}) exited ({code})", flush=True)
        if name == SERVERAPP:
            return 1  # a worker serves forever: any end is a failure
    return 1


def _worker(serve: Callable[[], None], name: str, logs: Path, arm: Callable[[], None]) -> None:
    """The forked child: dies with this process, writes to its own log, serves its tasks; never returns."""
    try:
        arm()
        ctypes.CDLL(None).prctl(PR_SET_NAME, f"trip-{name.removesuffix('-worker')}".encode()[:15], 0, 0, 0)
        log = os.open(logs / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        serve()
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # serving ends only by an error


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
