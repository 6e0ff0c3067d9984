"""Flower's simulation runtime on this machine (`trip run --engine flower-sim`): a `flower-superlink --simulation`
on a free loopback port with its own temporary FLWR_HOME, to which each run is submitted with `flwr run`, as under
`--engine flower`, and whose status is asked with `flwr list`. Each run is one `flwr-simulation` process; it runs
the same ServerApp, and the same ClientApp in ray actors, for one virtual SuperNode per source client
(partition-id i of the run's N clients: client i, `protocol.node_clients`).

trip starts that process itself (the SuperLink runs with `--isolation process`: it takes the run's task from the
Runtime API, as Flower's `flower-superexec` would), so that the kernel kills it if trip dies. Under Flower's
executor it would be the SuperExec's child, watching it from a thread that signals the process's own thread, not
the main one: killed with trip, the run would go on to its end, writing into the run folder.

Resources: each virtual node's ClientApp call gets as many cores as this process computes with (torch's thread
count, which ray passes on to the actor as OMP_NUM_THREADS): float sums then run in the same order as in-process,
so the numbers are the same bit for bit (a client on fewer threads sums in another order). Ray is bounded to this
machine's cores, so it keeps cores / threads actors (100 clients on 2 cores: one actor serving the virtual nodes in
turn, as the in-process engine does); the object store is capped at `OBJECT_STORE_BYTES` (messages and node
contexts are small: prompts, not images); no dashboard (Flower's default), no usage reporting; ray's files go under
the temporary FLWR_HOME. The ray processes are below the `flwr-simulation` process and share its fate: stopping
the federation (`terminate`) ends them, and if trip is SIGKILLed the kernel ends the simulation process, and ray
the rest (its two agents about a minute later)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import time
from pathlib import Path

import torch
from flwr.proto.runtime_pb2 import AcquireTaskRequest
from flwr.supercore.constant import TaskType

from trip.errors import TripError
from trip.federation.flower.local import BIN, LocalFederation, free_port, superlink_command, terminate, wait_for_port
from trip.federation.flower.polling import Backoff
from trip.federation.flower.worker import runtime_client

OBJECT_STORE_BYTES = 1 << 30
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES": str(OBJECT_STORE_BYTES),
           "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}


def check_ray() -> None:
    if importlib.util.find_spec("ray") is None:
        raise TripError('--engine flower-sim needs ray (Flower\'s simulation backend), which is not installed: '
                        'pip install "trip-fl[simulation]"')


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class SimulationFederation(LocalFederation):
    """A SuperLink in simulation mode: no SuperNode processes, the virtual nodes are made per run."""

    def __init__(self, logs: Path):
        super().__init__([], logs)
        self.simulations: list[subprocess.Popen] = []  # the flwr-simulation process of the current run
        self.client_cpus = torch.get_num_threads()
        self.cpus = max(cores(), self.client_cpus)
        self.env |= {**RAY_ENV, "RAY_TMPDIR": str(self.home / "ray")}

    def start(self) -> None:
        check_ray()
        self.logs.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        command = [*superlink_command("127.0.0.1", port, None, isolation="process"), "--simulation"]
        self.superlink = [self._spawn("superlink", command)]
        self._write_connection()
        wait_for_port(port, self.superlink[0], self.logs / "superlink.log")

    def submit(self, run_config: Path, clients: int = 0) -> int:
        run_id = super().submit(run_config, clients)
        self._launch(run_id)
        return run_id

    def _launch(self, run_id: int, timeout: float = 60.0) -> None:
        """Take the run's task from the Runtime API and start its `flwr-simulation` process (the last one has
        ended: runs go one at a time)."""
        terminate(self.simulations)
        client = runtime_client(self.address, None, TaskType.SIMULATION)
        request = AcquireTaskRequest(supported_task_types=[TaskType.SIMULATION])
        deadline, wait = time.monotonic() + timeout, Backoff()
        while not ((res := client.AcquireTask(request)).HasField("task") and res.token):
            if time.monotonic() > deadline:
                raise TripError(f"the SuperLink offered no task for run {run_id} within {timeout:g} s; see "
                                f"{self.logs / 'superlink.log'}")
            wait.pause()
        client.close()
        command = [str(BIN / "flwr-simulation"), "--runtime-api-address", self.address, "--token", res.token,
                   "--insecure"]
        self.simulations = [self._spawn(f"simulation-{run_id}", command)]

    def stop(self) -> None:
        terminate(self.simulations)
        super().stop()

    def run_options(self, clients: int) -> list[str]:
        """A virtual SuperNode per client, this process's thread count of cores each, ray bounded to the cores."""
        return ["--federation-config", f"num-supernodes={clients} backend='ray' "
                f"client-resources-num-cpus={self.client_cpus} init-args-num-cpus={self.cpus} "
                "init-args-logging-level='warning'"]
