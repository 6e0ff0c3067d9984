"""An experiment: every (seed, method, held-out domain) of a config, run on one engine, written to
one run folder (config.yaml, rounds.jsonl, results.json, summary.md)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trip import expert_usage, multidomain_results, results, safefile
from trip.checkpoint import RunCheckpoints, run_key
from trip.config import ALL_DOMAINS, ExperimentCfg, dump_config
from trip.errors import TripError, cannot_write
from trip.federation import multidomain, privacy, secure
from trip.federation.inprocess import FederationResult, RoundLogger, run_federation
from trip.federation.partition import client_domain, client_names
from trip.federation.rounds import select_round, selection_model
from trip.methods.base import Method
from trip.progress import progress
from trip.run_lock import LOCK_FILE, run_folder_lock
from trip.workspace import Workspace, prepare, targets_of

CLIENTS_FILE = "clients.json"
CONFIG_TMP = "config.yaml.tmp"  # a start killed while writing config.yaml may leave it; it is no content

Federate = Callable[[Method, str, int, RoundLogger], FederationResult]  # (method, target, seed, log)


def run_experiment(cfg: ExperimentCfg, out: Path, *, engine: str = "inprocess", resume: bool = False) -> list[dict]:
    """Runs every (seed, method, target) not already finished in `out`. A folder that holds a run of the
    same config is continued (finished entries are kept, an interrupted in-process run resumes from its
    last checkpoint); one that holds another config is refused. `resume` insists that there is one. The
    folder is locked for the whole run: a second writer is refused at once."""
    privacy.check_engine(cfg, engine)
    secure.check_engine(cfg, engine)
    if engine == "flower-sim":
        from trip.federation.flower.simulation import check_ray

        check_ray()  # before the data are prepared, which may take long
    with run_folder_lock(out):
        runs = _claim_run_folder(cfg, out, resume)
        ws = prepare(cfg)
        if cfg.federation.secure_aggregation:
            _check_secure_aggregation(ws, engine)
        for method in ws.methods:
            privacy.check_method(method, cfg)
        clients = _client_lists(ws)  # refuses a domain too small for its clients
        _check_clients(ws, out, clients)
        _write_config(out, cfg)  # after every check: a refused start leaves none behind
        safefile.write_text(out / CLIENTS_FILE, results.strict_json(clients))
        if engine in ("flower", "flower-sim"):
            from trip.federation.flower.engine import flower_federation, simulation_federation

            local = flower_federation if engine == "flower" else simulation_federation
            with local(ws, out) as federate:
                return _run_all(ws, out, runs, federate)
        return _run_all(ws, out, runs, _in_process(ws, out))


def _check_secure_aggregation(ws: Workspace, engine: str) -> None:
    """The SuperNodes of each run (its source domains; the held-out one is none): a SuperNode weighs what its
    clients weigh together, each domain's node under `flower`, each client its own virtual node under
    `flower-sim`."""
    for seed in ws.cfg.seeds:
        clients = {d: ws.domain_clients(d, seed) for d in ws.dataset.domains}
        for target in targets_of(ws.cfg, ws.dataset):
            sources = [clients[d] for d in ws.dataset.domains if d != target]
            weights = {client_domain(cs[0].name): [c.weight for c in cs] for cs in sources} \
                if engine != "flower-sim" else {c.name: [c.weight] for cs in sources for c in cs}
            secure.check(ws.cfg.federation, ws.methods, weights)


def _check_clients(ws: Workspace, out: Path, clients: dict) -> None:
    """Refuses what no run could start with: a method that cannot serve the run's number of clients, and a run
    folder whose clients were formed from other images (an image added, removed or renamed since it began: its
    finished entries and checkpoints would not be comparable)."""
    per_domain = ws.cfg.federation.clients_per_domain
    for target in targets_of(ws.cfg, ws.dataset):
        sources = [d for d in ws.dataset.domains if d != target]
        for method in ws.methods:
            method.check_clients(len(sources) * per_domain)
    changed = _changed_clients(_read_clients(out / CLIENTS_FILE), json.loads(results.strict_json(clients)))
    if changed:
        raise TripError(f"the images of the run in {out} changed since it began: client(s) {', '.join(changed[:5])}"
                        f"{' …' if len(changed) > 5 else ''} would hold other images than {out / CLIENTS_FILE} "
                        f"lists. Restore the data as it was, or start the run again in another --out")


def _read_clients(path: Path) -> dict:
    """The client lists a run folder's run began with; none where it has no readable clients.json."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _changed_clients(before: dict, now: dict) -> list[str]:
    """The clients whose image lists differ, in any seed; none where the folder recorded none."""
    if not before:
        return []
    return sorted({client for seed in before.keys() | now.keys()
                   for client in before.get(seed, {}).keys() | now.get(seed, {}).keys()
                   if before.get(seed, {}).get(client) != now.get(seed, {}).get(client)})


def _in_process(ws: Workspace, out: Path) -> Federate:
    def federate(method: Method, target: str, seed: int, log: RoundLogger) -> FederationResult:
        checkpoints = RunCheckpoints(out / "checkpoints" / run_key(method.label, target, seed))
        state = checkpoints.latest() if method.trainable else None
        return run_federation(method, ws.clients(target, seed), ws.evaluation(target), ws.cfg.train, seed, log,
                              federation=ws.cfg.federation, resume=state, on_round=checkpoints.save)

    return federate


def _run_all(ws: Workspace, out: Path, runs: list[dict], federate: Federate) -> list[dict]:
    cfg = ws.cfg
    done = {(r["method"], r["target"], r["seed"]) for r in runs}
    classes = ws.class_split.names(ws.dataset.classes) if ws.class_split else None
    with (out / "rounds.jsonl").open("a") as rounds_file:
        for seed in cfg.seeds:
            for method in ws.methods:
                for target in targets_of(cfg, ws.dataset):
                    if (method.label, target, seed) not in done:
                        runs.append(_run_one(ws, out, method, target, seed, rounds_file, federate))
                        results.write_results(out, cfg, runs, skipped_images=ws.skipped_images, classes=classes)
    usage = expert_usage.write(ws, out)  # before the figures: they read it
    warnings = expert_usage.collapse_warnings(usage)
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    summary = multidomain_results.write_summary if cfg.protocol == "multidomain" else results.write_summary
    summary(out, cfg, runs, warnings)
    from trip import viz  # matplotlib: imported only where figures are drawn (not in Flower workers)

    viz.write_run_figures(out)
    return runs


def _client_lists(ws: Workspace) -> dict:
    """clients.json: per seed, each source client's train and validation images (the same for every target)."""
    targets = targets_of(ws.cfg, ws.dataset)
    sources = [d for d in ws.dataset.domains if any(t != d for t in targets)]
    return {str(seed): ws.client_lists(seed, sources) for seed in ws.cfg.seeds}


def _claim_run_folder(cfg: ExperimentCfg, out: Path, resume: bool) -> list[dict]:
    """Finished runs already in `out` (none for a new folder); rounds.jsonl trimmed to what the finished
    runs and the checkpoints account for, so a resumed run never logs a round twice."""
    config_file = out / "config.yaml"
    if not config_file.is_file():
        if resume:
            raise TripError(f"--resume: {out} holds no run to continue (no config.yaml)")
        if any(p.name not in (LOCK_FILE, CONFIG_TMP) for p in out.iterdir()):
            raise TripError(f"output folder {out} is not empty and holds no trip run: choose another --out")
        return []
    if _read_text(config_file) != dump_config(cfg):
        raise TripError(f"output folder {out} holds a run of another config ({_config_diff(config_file, cfg)}): "
                        f"choose another --out, or delete the folder to start over")
    runs = _finished_runs(out / "results.json")
    _trim_rounds_log(out, runs)
    return runs


def _write_config(out: Path, cfg: ExperimentCfg) -> None:
    tmp = out / CONFIG_TMP
    try:
        tmp.write_text(dump_config(cfg))
        os.replace(tmp, out / "config.yaml")  # never half a config: that would block the rerun
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise cannot_write(out / "config.yaml", err, "the run's config") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise TripError(f"{path} is not text (not UTF-8): the run folder is damaged; restore the file, or "
                        f"choose another --out") from None


def _finished_runs(results_file: Path) -> list[dict]:
    if not results_file.is_file():
        return []
    try:
        runs = json.loads(_read_text(results_file))["runs"]
        if not all({"method", "target", "seed"} <= run.keys() for run in runs):
            raise TypeError("a run without method, target and seed")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise TripError(f"{results_file} is not a trip results file ({type(err).__name__}: {err}): restore it, "
                        f"or delete it to run its entries again (their checkpoints are kept)") from None
    return runs


def _config_diff(config_file: Path, cfg: ExperimentCfg) -> str:
    import yaml

    def flat(d, prefix=""):
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}{k}.").items()}
        return {prefix.rstrip("."): d}

    try:
        old = flat(yaml.safe_load(_read_text(config_file)))
    except yaml.YAMLError as err:
        raise TripError(f"{config_file} is not YAML ({str(err).splitlines()[0]}): the run folder is damaged; "
                        f"restore the file, or choose another --out") from None
    if "" in old:  # a scalar or an empty file
        raise TripError(f"{config_file} is not a trip config (not a mapping): the run folder is damaged; restore "
                        f"the file, or choose another --out")
    new = flat(cfg.model_dump(mode="json"))
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    return "differs in " + ", ".join(keys[:5]) + (" …" if len(keys) > 5 else "")


def _trim_rounds_log(out: Path, runs: list[dict]) -> None:
    log = out / "rounds.jsonl"
    if not log.is_file():
        return
    finished = {run_key(r["method"], r["target"], r["seed"]) for r in runs}
    next_round: dict[str, int] = {}  # unfinished run -> the first round its latest checkpoint has not done
    kept = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
            key, round_idx = run_key(rec["method"], rec["target"], rec["seed"]), int(rec["round"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the crash
        if key not in finished and key not in next_round:
            state = RunCheckpoints(out / "checkpoints" / key).latest()
            next_round[key] = state.next_round if state is not None else 0
        if key in finished or round_idx < next_round[key]:
            kept.append(line)
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, log)


def _log_checkpointed_rounds(out: Path, key: dict, log: RoundLogger) -> None:
    """Logs the rounds that the run's checkpoint holds and rounds.jsonl lacks, so that a resumed run logs every
    round once whatever engine wrote the checkpoint (a Flower ServerApp checkpoints a round before trip logs it:
    a kill in between loses only the log line). rounds.jsonl was trimmed by `_claim_run_folder`: every line parses."""
    state = RunCheckpoints(out / "checkpoints" / run_key(key["method"], key["target"], key["seed"])).latest()
    if state is None:
        return
    lines = (out / "rounds.jsonl").read_text().splitlines()
    logged = {rec["round"] for rec in map(json.loads, lines) if all(rec.get(k) == v for k, v in key.items())}
    for record in state.history:
        if record["round"] not in logged:
            log(record)


def _run_one(ws: Workspace, out: Path, method: Method, target: str, seed: int, rounds_file,
             federate: Federate) -> dict:
    cfg = ws.cfg
    torch.manual_seed(seed)
    sources = [d for d in ws.dataset.domains if d != target]
    total = cfg.train.rounds if method.trainable else 1
    tested = "in-domain" if target == ALL_DOMAINS else f"held out {target:<10}"
    bar = progress(total=total, desc=f"{method.label:>12} | {tested} | seed {seed}", unit="rounds")
    key = {"method": method.label, "target": target, "seed": seed}

    def log(record: dict) -> None:
        rounds_file.write(results.strict_json({**key, **record}) + "\n")
        rounds_file.flush()
        ev = record["eval"]["bma" if "bma" in record["eval"] else "server"]
        bar.set_postfix(val=f"{ev['val_mean']:.1f}", target=f"{ev['target']:.1f}")
        bar.update()

    start = time.perf_counter()
    with bar:
        if method.trainable:
            _log_checkpointed_rounds(out, key, log)
        result = federate(method, target, seed, log)
    select = multidomain.select if cfg.protocol == "multidomain" else select_round
    chosen = select(result.history, selection_model(method))
    return {**key, **chosen, "comm_params_per_round": method.comm_params,
            "comm_bytes_per_round": 4 * method.comm_params, "comm_upload_once_params": method.upload_params,
            "rounds": len(result.history),
            "clients": [c for d in sources for c in client_names(d, cfg.federation.clients_per_domain)],
            "time_s": round(time.perf_counter() - start, 2),
            "method_name": method.cfg.name}

