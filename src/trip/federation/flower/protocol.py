"""What the ServerApp and the ClientApps of trip agree on: the run config, the records of a message, and
which domain a SuperNode holds."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, UserConfig
from flwr.common.logger import LOGGER_NAME

from trip.config import ALL_DOMAINS, SEED_LIMIT, ExperimentCfg, method_label, parse_config
from trip.data.datasets import get_dataset
from trip.errors import TripError
from trip.federation.partition import client_names
from trip.outputs import write_text

APP_DIR = Path(__file__).parent / "app"  # the Flower App that `flwr run` bundles
MODELS = ("server", "bma")  # names of the models a round evaluates (as the in-process engine)
SHARED = "shared-{}"  # multidomain: the evaluate message's record of a model's global tensors (personalised models)
# In a run's out-dir: trip is stopping the federation; the ServerApp checkpoints no further round (server_app.py)
STOPPING = "stopping"


def accuracy_key(model: str, part: str) -> str:
    """The metric of a model's accuracy on a part of the evaluated splits (`Split.parts`): "acc-server" for a
    whole split, "acc-server-novel" for a part of it; model "": the ServerApp's own target evaluation ("acc")."""
    return "-".join(["acc", *filter(None, (model, part))])


@dataclass(frozen=True)
class RunSpec:
    """One Flower run: one (seed, method, held-out domain) of an experiment."""

    cfg: ExperimentCfg
    seed: int
    method: str  # a method label of cfg
    target: str
    out_dir: str = ""
    # valid updates a round needs, at most those asked for (1: as in-process, a round goes on while one is valid)
    min_clients: int = 1
    round_timeout: float = 600.0
    connect_timeout: float = 120.0
    checkpoint_dir: str = ""  # the server's per-round checkpoints (on the SuperLink's machine); "": none

    @property
    def sources(self) -> list[str]:
        """The source domains in canonical order: a client's index in this list seeds its batches."""
        return [d for d in get_dataset(self.cfg.data.name).domains if d != self.target]

    @property
    def clients(self) -> list[str]:
        """The source clients in canonical order (`Workspace.clients`): a client's index in it seeds its batches."""
        return [c for d in self.sources for c in client_names(d, self.cfg.federation.clients_per_domain)]

    def client_index(self, domain: str, k: int) -> int:
        """The index of the domain's k-th client among the run's clients."""
        return self.sources.index(domain) * self.cfg.federation.clients_per_domain + k

    def run_config(self) -> dict[str, str | int | float]:
        return {"experiment": self.cfg.model_dump_json(), "seed": self.seed, "method": self.method,
                "target": self.target, "out-dir": self.out_dir, "min-clients": self.min_clients,
                "round-timeout": self.round_timeout, "connect-timeout": self.connect_timeout,
                "checkpoint-dir": self.checkpoint_dir}

    @classmethod
    def from_run_config(cls, rc: UserConfig) -> RunSpec:
        if not rc.get("experiment"):
            raise TripError("the run config has no 'experiment': make one with `trip flower run-config`")
        cfg = parse_config(json.loads(str(rc["experiment"])), source="run config 'experiment'")
        spec = cls(cfg, int(rc["seed"]), str(rc["method"]), str(rc["target"]), str(rc["out-dir"]),
                   int(rc["min-clients"]), float(rc["round-timeout"]), float(rc["connect-timeout"]),
                   str(rc.get("checkpoint-dir", "")))
        spec.check()
        return spec

    def check(self) -> None:
        domains = get_dataset(self.cfg.data.name).domains
        if self.cfg.protocol == "multidomain" and self.target != ALL_DOMAINS:
            raise TripError(f"run config: a multidomain run holds no domain out; its target is {ALL_DOMAINS!r}, "
                            f"got {self.target!r}")
        if self.cfg.protocol != "multidomain" and self.target not in domains:
            raise TripError(f"run config: target {self.target!r} is not a domain of {self.cfg.data.name} "
                            f"({', '.join(domains)})")
        labels = [method_label(m) for m in self.cfg.methods]
        if self.method not in labels:
            raise TripError(f"run config: method {self.method!r} is not in the experiment ({', '.join(labels)})")
        if not 0 <= self.seed < SEED_LIMIT:
            raise TripError(f"run config: seed {self.seed} is out of range: a seed is an integer from 0 to 2**32 - 1")
        if not 1 <= self.min_clients <= len(self.clients):
            raise TripError(f"run config: min-clients must be 1..{len(self.clients)}, got {self.min_clients}")


def write_run_config(spec: RunSpec, path: Path) -> Path:
    """A TOML file for `flwr run --run-config PATH` (the experiment JSON does not fit on a command line)."""
    import tomli_w

    spec.check()
    return write_text(path, tomli_w.dumps(spec.run_config()), "-o", "run.toml")


def node_clients(node_config: UserConfig, spec: RunSpec) -> tuple[str, list[int]]:
    """The domain a SuperNode holds and the numbers (within it) of the clients it serves. A deployed SuperNode
    names its domain (`domain="sketch"`) and serves all of its clients (none if it is the held-out one). A local or
    simulated one has partition-id i of num-partitions P: the i-th of P equal runs of the run's clients in their
    order, each within one domain; P = the source domains gives a node per domain (`--engine flower`), P = the
    clients a node per client (`--engine flower-sim`)."""
    if str(node_config.get("dataset", spec.cfg.data.name)) != spec.cfg.data.name:
        raise TripError(f"this SuperNode holds {node_config['dataset']} data; the run is on {spec.cfg.data.name}")
    k = spec.cfg.federation.clients_per_domain
    if "domain" in node_config:
        domain = str(node_config["domain"])
        domains = get_dataset(spec.cfg.data.name).domains
        if domain not in domains:
            raise TripError(f"node config: domain {domain!r} is not a domain of {spec.cfg.data.name} "
                            f"({', '.join(domains)})")
        return domain, [] if domain == spec.target else list(range(k))
    if "partition-id" in node_config:
        pid, parts = int(node_config["partition-id"]), int(node_config.get("num-partitions", len(spec.sources)))
        clients = len(spec.clients)
        per_node = clients // parts if 0 < parts <= clients and clients % parts == 0 else 0
        if not per_node or k % per_node:
            raise TripError(f"node config: num-partitions {parts} does not split the run's {clients} clients "
                            f"({len(spec.sources)} domains of {k}) into equal parts within a domain")
        if not 0 <= pid < parts:
            raise TripError(f"node config: partition-id {pid} is out of range: there are {parts} partitions")
        first = pid * per_node
        return spec.sources[first // k], list(range(first % k, first % k + per_node))
    raise TripError("node config names no domain: start the SuperNode with --node-config 'domain=\"NAME\" "
                    "data-root=\"DIR\"' (deployment) or 'partition-id=I num-partitions=P' (simulation)")


def quiet_root_logger() -> None:
    """Keep Flower's log records off the root logger: open_clip logs through `logging.info`, which installs a
    root handler, and every Flower line of a ServerApp or worker process would then print twice."""
    logging.getLogger(LOGGER_NAME).propagate = False


def to_record(params: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in params.items()})


def from_record(record: ArrayRecord, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(arr.numpy())).to(device) for k, arr in record.items()}
