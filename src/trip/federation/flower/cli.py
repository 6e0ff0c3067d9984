"""`trip flower ...`: the deployment tools (docs/deploy.md). Imports stay light until a command runs."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    flower = sub.add_parser("flower", help="run trip on a Flower deployment (docs/deploy.md)")
    cmds = flower.add_subparsers(dest="flower_command", required=True)

    certs = cmds.add_parser("certs", help="make a CA, the SuperLink's TLS certificate and SuperNode keys")
    certs.add_argument("dir", type=Path)
    certs.add_argument("--host", action="append", default=[], metavar="NAME_OR_IP",
                       help="a name or IP the SuperNodes use to reach the SuperLink (repeatable; "
                            "localhost and 127.0.0.1 are always included)")
    certs.add_argument("--nodes", type=_at_least(0), default=4, help="SuperNode key pairs to make (default 4)")
    certs.add_argument("--force", action="store_true", help="replace the CA and keys already in DIR")
    certs.set_defaults(func=_certs)

    link = cmds.add_parser("superlink", help="start a SuperLink with TLS and SuperNode authentication")
    link.add_argument("--certs", type=Path, required=True, help="folder of `trip flower certs`")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=_port, default=9092)
    link.add_argument("--database", default=None, help="SQLite file for the SuperLink state (default: memory)")
    link.set_defaults(func=_superlink)

    node = cmds.add_parser("supernode", help="start this site's SuperNode (one domain) and its warm worker")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--ca", type=Path, required=True, help="the federation's ca.crt")
    node.add_argument("--key", type=Path, required=True, help="this site's private key (node<i>.key)")
    node.add_argument("--domain", required=True, help="the domain this site holds, e.g. sketch")
    node.add_argument("--data-root", type=Path, required=True, help="folder holding the data set folder")
    node.add_argument("--dataset", help="the data set this site holds (runs on another one are refused)")
    node.add_argument("--runtime-port", type=_port, default=9094, help="local port of the SuperNode Runtime API")
    node.add_argument("--state-dir", type=Path, help="where this site keeps its clients' private tensors so that a "
                                                     "run resumes (default: <data-root>/.trip-state)")
    node.set_defaults(func=_supernode)

    worker = cmds.add_parser("worker", help="run the ClientApp tasks of a SuperNode (or the ServerApp tasks of a "
                                            "SuperLink) started with --isolation process, keeping CLIP in memory")
    worker.add_argument("--runtime-api", required=True, metavar="HOST:PORT")
    worker.add_argument("--serverapp", action="store_true", help="serve a SuperLink's ServerApp tasks")
    worker.add_argument("--root-certificates", default=None, help="CA of a TLS Runtime API")
    worker.set_defaults(func=_worker)

    wait = cmds.add_parser("wait", help="wait for a Flower run to finish; exit 0 only if it completed "
                                        "(`flwr run` exits 0 even when the run fails)")
    wait.add_argument("run_id", type=int, metavar="RUN_ID")
    wait.add_argument("connection", metavar="CONNECTION", help="the SuperLink connection of `flwr run`, e.g. trip")
    wait.add_argument("--poll", type=_seconds, default=5.0, help="seconds between two status checks")
    wait.set_defaults(func=_wait)

    rc = cmds.add_parser("run-config", help="write the run config (TOML) of one run for `flwr run --run-config`")
    rc.add_argument("config", type=Path)
    rc.add_argument("--target", required=True, help="the held-out domain (\"all\" for a multidomain config)")
    rc.add_argument("--seed", type=int, help="default: the config's first seed")
    rc.add_argument("--method", help="a method label of the config (default: the first method)")
    rc.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                    help="override config keys, as `trip run --set`")
    rc.add_argument("--out-dir", default="", help="where the ServerApp writes its results (SuperLink machine)")
    rc.add_argument("--min-clients", type=_at_least(1), default=1, help="valid updates a round needs (default 1)")
    rc.add_argument("--round-timeout", type=_seconds, default=600.0, help="seconds to wait for a round's replies")
    rc.add_argument("--connect-timeout", type=_seconds, default=120.0,
                    help="seconds to wait at start for a SuperNode of every source domain")
    rc.add_argument("--checkpoint-dir", default="", help="where the ServerApp checkpoints each round and resumes "
                                                         "from (SuperLink machine; default: no checkpoints)")
    rc.add_argument("-o", "--output", type=Path, default=Path("run.toml"))
    rc.set_defaults(func=_run_config)


def _seconds(text: str) -> float:
    """A time limit: a positive, finite number of seconds (argparse turns the ValueError into exit 2)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} is not a positive number of seconds")
    return value


def _at_least(low: int):
    def count(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        return value
    return count


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"{text} is not a port (1-65535)")
    return value


def _certs(args: argparse.Namespace) -> int:
    from trip.federation.flower.certs import make_certs

    for path in make_certs(args.dir, args.host, args.nodes, force=args.force):
        print(path)
    return 0


def _superlink(args: argparse.Namespace) -> int:
    from trip.federation.flower.local import FLOWER_ENV, Tls, superlink_command

    cmd = superlink_command(args.host, args.port, Tls.from_dir(args.certs, nodes=0), args.database)
    print(" ".join(cmd), flush=True)
    os.execve(cmd[0], cmd, {**os.environ, **FLOWER_ENV})


def _supernode(args: argparse.Namespace) -> int:
    from trip.federation.flower.local import FLOWER_ENV, spawn, supernode_command, terminate, trip_worker

    _check_site(args.data_root, args.dataset, args.domain)
    state_dir = (args.state_dir or args.data_root / ".trip-state").resolve()
    node_config = f'domain="{args.domain}" data-root="{args.data_root.resolve()}" state-dir="{state_dir}"'
    if args.dataset:
        node_config += f' dataset="{args.dataset}"'
    supernode = supernode_command(args.superlink, args.runtime_port, node_config, (args.ca, args.key))
    worker = trip_worker(0, f"127.0.0.1:{args.runtime_port}")
    env = {**os.environ, **FLOWER_ENV}
    print(" ".join(supernode), flush=True)
    procs = [spawn(cmd, env=env) for cmd in (supernode, worker)]
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return next(p.returncode for p in procs if p.returncode is not None)
    finally:
        terminate(procs)


def _check_site(data_root: Path, dataset: str | None, domain: str) -> None:
    """Refuse at start what every run would refuse: a missing data root, an unknown data set or domain."""
    from trip.data.datasets import dataset_root, get_dataset
    from trip.errors import TripError

    if not data_root.is_dir():
        raise TripError(f"--data-root {data_root} is not a folder: give the folder that holds the data set's folder")
    if dataset is None:
        return
    spec = get_dataset(dataset)
    if domain not in spec.domains:
        raise TripError(f"--domain {domain!r} is not a domain of {dataset} ({', '.join(spec.domains)})")
    if dataset != "synthetic":  # the synthetic set is generated under the data root on first use
        dataset_root(spec, str(data_root), 0, seed=0)  # refuses a data root without the data set


def _worker(args: argparse.Namespace) -> int:
    import trip.federation.flower.client_app  # noqa: F401 - import torch and open_clip now, not at the first task
    from trip.federation.flower.worker import serve

    serve(args.runtime_api, args.root_certificates, serverapp=args.serverapp)
    return 0


def _wait(args: argparse.Namespace) -> int:
    from trip.errors import TripError
    from trip.federation.flower.local import FLOWER_ENV, run_status

    env = {**os.environ, **FLOWER_ENV}
    status, details = run_status(args.run_id, args.connection, env)
    while not status.startswith("finished"):
        time.sleep(args.poll)
        status, details = run_status(args.run_id, args.connection, env)
    if status != "finished:completed":
        raise TripError(f"Flower run {args.run_id} ended {status}: {details}; its ServerApp log: "
                        f"`flwr log {args.run_id} {args.connection} --show`")
    print(f"Flower run {args.run_id}: {status}")
    return 0


def _run_config(args: argparse.Namespace) -> int:
    from trip.config import load_config, method_label
    from trip.federation.flower.protocol import APP_DIR, RunSpec, write_run_config

    cfg = load_config(args.config, args.overrides)
    method = args.method or method_label(cfg.methods[0])
    seed = cfg.seeds[0] if args.seed is None else args.seed
    spec = RunSpec(cfg, seed, method, args.target, args.out_dir, args.min_clients, args.round_timeout,
                   args.connect_timeout, args.checkpoint_dir)
    path = write_run_config(spec, args.output)
    print(f"wrote {path}; start the run with:\n  flwr run {APP_DIR} <connection> --run-config {path} --stream\n"
          f"then `trip flower wait <run-id> <connection>` exits non-zero unless it completed")
    return 0
