"""`trip run --engine flower` and `--engine flower-sim`: each (seed, method, held-out domain) of an experiment is
one Flower run, on a local federation (a SuperLink and one SuperNode per source domain on 127.0.0.1; SuperNode i
holds the i-th source domain of the run's held-out one: `partition-id=i`), or on Flower's simulation runtime (a
virtual SuperNode per source client, `simulation.py`). The ServerApp writes each run's rounds and final models
under <run folder>/flower/<method>-<target>-seed<seed>/; this side forwards the rounds as they come, checks the
run's status with `flwr list`, and returns what the in-process engine returns.

Resume: the ServerApp checkpoints each round into <run folder>/checkpoints/<run key>/ (the in-process engine's
files) and continues from the latest one; each SuperNode keeps its clients' private tensors under
<run folder>/checkpoints/<run key>/node-<domain>/ (`PrivateStore`: node config `state-dir`, or for a virtual
node the run's checkpoint folder)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from trip.checkpoint import RunCheckpoints, run_key
from trip.config import ExperimentCfg
from trip.errors import TripError
from trip.federation.flower.local import LocalFederation
from trip.federation.flower.private_store import STATE_DIR
from trip.federation.flower.protocol import STOPPING, RunSpec, write_run_config
from trip.federation.flower.simulation import SimulationFederation
from trip.federation.inprocess import FederationResult, RoundLogger
from trip.methods.base import Method
from trip.workspace import Workspace


@contextmanager
def flower_federation(ws: Workspace, out: Path) -> Iterator[FlowerRuns]:
    """A local federation for the experiment of `ws`, stopped on exit. Prepare `ws` first: the SuperNodes and
    ServerApps then load the frozen features from the cache instead of computing them at once."""
    held_out = 0 if ws.cfg.protocol == "multidomain" else 1
    n = len(ws.dataset.domains) - held_out  # a node per source domain of a run
    checkpoints = (out / "checkpoints").resolve()
    configs = [f'partition-id={i} num-partitions={n} {STATE_DIR}="{checkpoints}"' for i in range(n)]
    with LocalFederation(configs, out / "flower" / "logs") as fed:
        yield FlowerRuns(fed, ws.cfg, out / "flower", checkpoints=checkpoints)


@contextmanager
def simulation_federation(ws: Workspace, out: Path) -> Iterator[FlowerRuns]:
    """Flower's simulation runtime for the experiment of `ws`, stopped on exit (prepare `ws` first, as above)."""
    with SimulationFederation(out / "flower" / "logs") as fed:
        yield FlowerRuns(fed, ws.cfg, out / "flower", checkpoints=(out / "checkpoints").resolve())


class FlowerRuns:
    """Called as the in-process engine is: (method, held-out domain, seed, log) -> FederationResult."""

    def __init__(self, fed: LocalFederation, cfg: ExperimentCfg, root: Path, checkpoints: Path | None = None,
                 **run_options):
        """`checkpoints`: the run folder's checkpoints/ (None: no resume)."""
        self.fed, self.cfg, self.root, self.run_options = fed, cfg, root, run_options
        self.checkpoints = checkpoints

    def __call__(self, method: Method, target: str, seed: int, log: RoundLogger) -> FederationResult:
        run_dir = (self.root / f"{method.label}-{target}-seed{seed}").resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("rounds.jsonl", "result.json", STOPPING):
            (run_dir / stale).unlink(missing_ok=True)
        folder = self.checkpoints / run_key(method.label, target, seed) if self.checkpoints else None
        done = self._resumed_rounds(folder) if folder and method.trainable else []
        spec = RunSpec(self.cfg, seed, method.label, target, out_dir=str(run_dir),
                       checkpoint_dir=str(folder or ""), **self.run_options)
        run_id = self.fed.submit(write_run_config(spec, run_dir / "run_config.toml"), len(spec.clients))
        rounds = RoundTail(run_dir / "rounds.jsonl", log, done)
        try:
            status, details = self.fed.wait(run_id, on_tick=rounds.poll)
        except BaseException:  # interrupted: the ServerApp may outlive trip's wait by a round
            with suppress(OSError):
                (run_dir / STOPPING).touch()
            raise
        if status != "finished:completed":
            raise TripError(f"Flower run {run_id} ({method.label}, held out {target}, seed {seed}) ended "
                            f"{status}: {details}\nServerApp log (tail):\n{self.fed.log_tail(run_id)}\n"
                            f"SuperLink and SuperNode logs: {self.fed.logs}")
        return FederationResult(rounds.records, read_models(run_dir / "models.safetensors"))

    @staticmethod
    def _resumed_rounds(folder: Path) -> list[dict]:
        """The rounds of the checkpoint the ServerApp will continue from (experiment.py has logged them)."""
        state = RunCheckpoints(folder).latest()
        return state.history if state is not None else []


class RoundTail:
    """The records of a rounds.jsonl that the ServerApp is writing, passed on line by line."""

    def __init__(self, path: Path, log: RoundLogger, done: list[dict] | None = None):
        """`done`: the records of a resumed run's earlier rounds (already logged; the ServerApp writes them first)."""
        self.path, self.log = path, log
        self.records: list[dict] = list(done or [])
        self.logged = len(self.records)

    def poll(self) -> bool:
        """Pass on the new records; True once the ServerApp has written its result (the run is ending)."""
        if self.path.is_file():
            lines = self.path.read_text().split("\n")[:-1]  # complete lines only
            for line in lines[self.logged:]:
                record = json.loads(line)
                self.records.append(record)
                self.logged += 1
                self.log(record)
        return self.path.with_name("result.json").is_file()


def read_models(path: Path) -> dict[str, dict]:
    """models.safetensors ("server/experts", "bma/experts", ...) as {"server": {...}, "bma": {...}}."""
    with safe_open(str(path), "pt") as f:
        models: dict[str, dict] = {name: {} for name in f.metadata()["models"].split(",")}
    for key, value in load_file(path).items():
        model, name = key.split("/", 1)
        models.setdefault(model, {})[name] = value
    return models
