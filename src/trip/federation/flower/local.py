"""A real Flower federation on 127.0.0.1: one `flower-superlink` and N `flower-supernode` processes, all with
`--isolation process` and their apps run by warm trip workers (forked from one process that imported their code,
trip.federation.flower.zygote), with their own temporary FLWR_HOME and free ports,
driven with the `flwr` CLI (`flwr run`, `flwr list`, `flwr log`), optionally over TLS with SuperNode
authentication. The same path as a deployment, without ray. Every process it starts is stopped on exit, with
everything they started, and is killed by the kernel if trip itself dies (SIGKILL included)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from trip.errors import TripError
from trip.federation.flower.home import make_home, remove_home
from trip.federation.flower.protocol import APP_DIR
from trip.shared_cores import SHARED_CORES_ENV

CONNECTION = "trip-local"
BIN = Path(sys.executable).parent  # flwr's commands live beside the interpreter that runs trip
FLOWER_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
              "FLWR_DISABLE_UPDATE_CHECK": "1"}


@dataclass(frozen=True)
class Tls:
    """Files of `trip flower certs`: the CA, the SuperLink's certificate and key, and SuperNode keys."""

    ca: Path
    cert: Path
    key: Path
    node_keys: tuple[Path, ...]  # private keys; the public key of each is beside it (.pub)

    @classmethod
    def from_dir(cls, folder: Path, nodes: int) -> Tls:
        keys = tuple(folder / f"node{i}.key" for i in range(nodes))
        tls = cls(folder / "ca.crt", folder / "server.pem", folder / "server.key", keys)
        missing = [p for p in (tls.ca, tls.cert, tls.key, *keys) if not p.is_file()]
        if missing:
            raise TripError(f"missing TLS files {[str(p) for p in missing]}: run `trip flower certs {folder} "
                            f"--nodes {nodes}`")
        return tls


def superlink_command(host: str, port: int, tls: Tls | None, database: str | None = None,
                      isolation: str = "subprocess") -> list[str]:
    """`flower-superlink` over TLS with SuperNode authentication (or --insecure without `tls`); with isolation
    "process", a trip worker runs its ServerApps (`trip flower worker --serverapp`)."""
    cmd = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port), "--isolation", isolation]
    if database:
        cmd += ["--database", database]
    if tls is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth"]


def supernode_command(superlink: str, runtime_port: int, node_config: str,
                      auth: tuple[Path, Path] | None) -> list[str]:
    """`flower-supernode` whose ClientApp tasks a trip worker runs (`--isolation process`), authenticated with
    `auth` = (CA certificate, the node's private key) over TLS, or --insecure without; with trip's poll waits
    (trip.federation.flower.polling) instead of Flower's seconds."""
    cmd = [sys.executable, "-m", "trip.federation.flower.polling", "flower-supernode", "--superlink", superlink,
           "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port), "--node-config", node_config]
    if auth is None:
        return [*cmd, "--insecure"]
    return [*cmd, "--root-certificates", str(auth[0]), "--auth-supernode-private-key", str(auth[1])]


def trip_worker(node: int, runtime_api: str) -> list[str]:
    """The command that serves SuperNode `node`'s ClientApp tasks: trip's warm worker."""
    return [sys.executable, "-m", "trip.cli", "flower", "worker", "--runtime-api", runtime_api]


def forked_workers(serverapp_api: str, clientapps: dict[str, str], logs: Path, tls: Tls | None) -> list[str]:
    """The command that runs the ServerApps of the SuperLink at `serverapp_api` and the ClientApps of the
    SuperNodes {worker name: Runtime API} in workers forked from one process (trip.federation.flower.zygote)."""
    ca = ["--root-certificates", str(tls.ca)] if tls else []
    nodes = [arg for name, api in clientapps.items() for arg in ("--clientapp", f"{name}={api}")]
    return [sys.executable, "-m", "trip.federation.flower.zygote", "--logs", str(logs), "--serverapp", serverapp_api,
            *nodes, *ca]


def no_worker(node: int, runtime_api: str) -> list[str] | None:
    return None


class LocalFederation:
    def __init__(self, node_configs: list[str], logs: Path, tls: Tls | None = None,
                 worker: Callable[[int, str], list[str] | None] = no_worker):
        """`worker(i, runtime_api)`: a command that serves SuperNode i's ClientApp tasks in a process of its own,
        or None (the default) for a worker forked with the others (tests give a worker that fails)."""
        self.node_configs, self.logs, self.tls, self.worker = node_configs, logs, tls, worker
        self.home, self._home_lock = make_home()
        self.env = {**SHARED_CORES_ENV, **os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.home)}
        self.superlink: list[subprocess.Popen] = []  # the SuperLink and the worker that runs its ServerApps
        self.nodes: list[list[subprocess.Popen]] = []  # per node: the SuperNode and its worker

    def __enter__(self) -> LocalFederation:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        runtime_apis = [f"127.0.0.1:{free_port()}" for _ in self.node_configs]
        own = [self.worker(i, api) for i, api in enumerate(runtime_apis)]
        forked = {f"worker{i}": api for i, (api, cmd) in enumerate(zip(runtime_apis, own)) if cmd is None}
        self.superlink = [self._spawn("superlink", superlink_command("127.0.0.1", port, self.tls,
                                                                     isolation="process")),
                          self._spawn("workers", forked_workers(self.address, forked, self.logs, self.tls))]
        self._write_connection()
        wait_for_port(port, self.superlink[0], self.logs / "superlink.log")
        if self.tls:
            keys = [str(key.with_suffix(".pub")) for key in self.tls.node_keys[:len(self.node_configs)]]
            with ThreadPoolExecutor() as pool:  # one `flwr` process per key: start them together
                list(pool.map(lambda key: self.flwr("supernode", "register", key, CONNECTION), keys))
        for i, (api, cmd) in enumerate(zip(runtime_apis, own)):
            self.nodes.append(self._start_node(i, api, cmd))

    def _start_node(self, i: int, runtime_api: str, worker: list[str] | None) -> list[subprocess.Popen]:
        auth = (self.tls.ca, self.tls.node_keys[i]) if self.tls else None
        port = int(runtime_api.rsplit(":", 1)[1])
        procs = [self._spawn(f"supernode{i}", supernode_command(self.address, port, self.node_configs[i], auth))]
        return procs + ([self._spawn(f"worker{i}", worker)] if worker else [])

    def _write_connection(self) -> None:
        tls = f'root-certificates = "{self.tls.ca}"' if self.tls else "insecure = true"
        (self.home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n'
                                               f'[superlink.{CONNECTION}]\naddress = "{self.address}"\n{tls}\n')

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("ab") as log:
            return spawn(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    # --- runs -------------------------------------------------------------------------------------------

    def flwr(self, *args: str) -> str:
        """Run a `flwr` command against this federation; its stdout."""
        return flwr(*args, env=self.env)

    def submit(self, run_config: Path, clients: int = 0) -> int:
        """`clients`: the run's source clients (a simulation makes a virtual SuperNode for each)."""
        out = self.flwr("run", str(APP_DIR), CONNECTION, "--run-config", str(run_config), *self.run_options(clients),
                        "--format", "json")
        return int(_last_json(out)["run-id"])

    def run_options(self, clients: int) -> list[str]:
        """More `flwr run` options for a run of `clients` clients: none, the SuperNodes are running already."""
        return []

    def status(self, run_id: int) -> tuple[str, str]:
        return run_status(run_id, CONNECTION, self.env)

    def wait(self, run_id: int, on_tick: Callable[[], bool] = lambda: False, poll: float = 0.5,
             status_every: float = 30.0) -> tuple[str, str]:
        """Block until the run finishes; its (status, details), e.g. ("finished:completed", ""). `on_tick` runs
        every `poll` s; the status is asked when it returns True (the run looks done) or every `status_every` s
        (each `flwr list` is a process: on a small machine it competes with the run)."""
        asked = time.monotonic()  # just submitted: not done yet
        while True:
            looks_done = on_tick()
            if looks_done or time.monotonic() - asked >= status_every:
                asked = time.monotonic()
                status, details = self.status(run_id)
                if status.startswith("finished"):
                    on_tick()
                    return status, details
            self._check_alive()
            time.sleep(poll)

    def log_tail(self, run_id: int, chars: int = 4000) -> str:
        try:
            return self.flwr("log", str(run_id), CONNECTION, "--show")[-chars:]
        except (TripError, subprocess.TimeoutExpired) as err:
            return f"(no log: {err})"

    def _check_alive(self) -> None:
        for proc, name in zip(self.superlink, ("superlink", "workers")):
            if proc.poll() is not None:
                raise TripError(f"the {name} process exited ({proc.returncode}); see {self.logs / name}.log")

    # --- stopping ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """The ServerApps' worker first, then the SuperNodes, then the SuperLink: a ServerApp that outlived the
        SuperNodes would go on aggregating, and checkpointing, rounds without their clients."""
        superlink, apps = self.superlink[:1], self.superlink[1:]
        for procs in [apps, *self.nodes, superlink]:
            terminate(procs)
        if self._home_lock is not None:
            remove_home(self.home, self._home_lock)
            self._home_lock = None


def flwr(*args: str, env: dict[str, str]) -> str:
    """Run a `flwr` command; its stdout."""
    res = subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise TripError(f"`flwr {' '.join(args[:2])}` failed ({res.returncode}): {res.stderr[-2000:]}"
                        f"{res.stdout[-2000:]}")
    return res.stdout


def run_status(run_id: int, connection: str, env: dict[str, str]) -> tuple[str, str]:
    """(status, details) of a run, e.g. ("finished:failed", "ServerApp failed with exception: ...")."""
    run = _last_json(flwr("list", connection, "--run-id", str(run_id), "--format", "json", env=env))["runs"][0]
    return run["status"], run.get("status-details", "")


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def spawn(cmd: list[str], **popen) -> subprocess.Popen:
    """A process in a session of its own (a Ctrl-C in the terminal reaches trip only, which stops it in order)
    that the kernel kills when the thread that started it ends: if trip is SIGKILLed, nothing it started lives
    on. Only from the main thread, which lives as long as trip (Linux; otherwise `terminate` is all)."""
    armed = sys.platform == "linux" and threading.current_thread() is threading.main_thread()
    arm = death_signal(os.getpid()) if armed else None
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=arm, **popen)


def death_signal(parent: int) -> Callable[[], None]:
    """What a child of `parent` calls first (after fork) to be SIGKILLed when `parent` ends."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it between fork and exec

    def arm() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # trip died before the line above: nobody would send the signal
            os.kill(os.getpid(), signal.SIGKILL)

    return arm


def terminate(procs: list[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM (SIGKILL after `grace` s) to the processes, their process groups and every descendant (Flower
    starts some of its processes in sessions of their own)."""
    pids = [p.pid for p in procs if p.poll() is None]
    pids += [d for pid in pids for d in descendants(pid)]
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        for p in procs:
            p.poll()
        time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)
    for p in procs:
        p.wait()


def _signal(pid: int, sig: int) -> None:
    for send in (lambda: os.killpg(pid, sig), lambda: os.kill(pid, sig)):
        try:
            send()
        except (ProcessLookupError, PermissionError):
            pass


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TripError(f"the SuperLink exited at start ({proc.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TripError(f"the SuperLink did not listen on port {port} within {timeout:g} s; see {log}")


def _last_json(text: str) -> dict:
    """The JSON object the `flwr` CLI prints with --format json (after any other output)."""
    start = text.find("{")
    if start < 0:
        raise TripError(f"no JSON in the flwr output: {text[-1000:]}")
    return json.loads(text[start:])
