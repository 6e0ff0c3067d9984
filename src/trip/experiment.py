"""An experiment: every (seed, method, held-out domain) of a config, run on one engine, written to
one run folder (config.yaml, rounds.jsonl, results.json, summary.md)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from trip import results
from trip.backbone import Backbone, cache_dir, load_backbone, resolve_device
from trip.config import ExperimentCfg, dump_config, method_label
from trip.data.datasets import DatasetSpec, dataset_root, get_dataset
from trip.data.folder import Domain, scan_domain, split_indices, subsample
from trip.errors import TripError
from trip.features import DomainFeatures, FrozenStore
from trip.federation.inprocess import Client, run_federation, select_round
from trip.methods import build_method
from trip.methods.base import Method, Split


@dataclass
class Workspace:
    """What every run of an experiment shares: the backbone, the domains and their frozen features."""

    cfg: ExperimentCfg
    backbone: Backbone
    dataset: DatasetSpec
    domains: dict[str, Domain]
    frozen: dict[str, DomainFeatures]
    methods: list[Method]

    def split(self, domain: str, index) -> Split:
        f = self.frozen[domain]
        idx = torch.as_tensor(index, dtype=torch.int64)
        dev = self.backbone.device
        return Split(F.normalize(f.features[idx], dim=-1).to(dev),
                     torch.as_tensor(self.domains[domain].labels[index]).to(dev),
                     f.cls[idx].to(dev), {k: v[idx].to(dev) for k, v in f.routing.items()})

    def clients(self, target: str, seed: int) -> list[Client]:
        out = []
        for name in self.dataset.domains:
            if name == target:
                continue
            train_idx, val_idx = split_indices(len(self.domains[name]), self.cfg.data.val_fraction, seed)
            out.append(Client(name, self.split(name, train_idx), self.split(name, val_idx)))
        return out

    def target(self, name: str) -> Split:
        return self.split(name, list(range(len(self.domains[name]))))


def targets_of(cfg: ExperimentCfg, spec: DatasetSpec) -> list[str]:
    if cfg.data.targets == "all":
        return list(spec.domains)
    unknown = [t for t in cfg.data.targets if t not in spec.domains]
    if unknown:
        raise TripError(f"data.targets: {unknown} are not domains of {spec.name} ({', '.join(spec.domains)})")
    return list(cfg.data.targets)


def prepare(cfg: ExperimentCfg) -> Workspace:
    spec = get_dataset(cfg.data.name)
    targets_of(cfg, spec)
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, device)
    root = dataset_root(spec, cfg.data.root, cfg.data.images_per_class, seed=0)
    domains = {d: subsample(scan_domain(root, d, spec.classes), cfg.data.max_images_per_domain, seed=0)
               for d in spec.domains}
    methods = [build_method(m, backbone, spec.classes) for m in cfg.methods]
    needed = list(dict.fromkeys(s for m in methods for s in m.routing_specs()))
    store = FrozenStore(backbone, cache_dir())
    frozen = {d: store.load(spec.name, dom, needed) for d, dom in domains.items()}
    return Workspace(cfg, backbone, spec, domains, frozen, methods)


def run_experiment(cfg: ExperimentCfg, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    ws = prepare(cfg)
    runs: list[dict] = []
    rounds_file = (out / "rounds.jsonl").open("w")
    try:
        for seed in cfg.seeds:
            for method in ws.methods:
                for target in targets_of(cfg, ws.dataset):
                    runs.append(_run_one(ws, method, target, seed, rounds_file))
                    results.write_results(out, cfg, runs)
    finally:
        rounds_file.close()
    results.write_summary(out, cfg, runs)
    return runs


def _run_one(ws: Workspace, method: Method, target: str, seed: int, rounds_file) -> dict:
    cfg = ws.cfg
    torch.manual_seed(seed)
    clients = ws.clients(target, seed)
    total = cfg.train.rounds if method.trainable else 1
    bar = tqdm(total=total, desc=f"{method.label:>12} | held out {target:<10} | seed {seed}", leave=False)
    key = {"method": method.label, "target": target, "seed": seed}

    def log(record: dict) -> None:
        rounds_file.write(json.dumps({**key, **record}) + "\n")
        rounds_file.flush()
        ev = record["eval"]["bma" if "bma" in record["eval"] else "server"]
        bar.set_postfix(val=f"{ev['val_mean']:.1f}", target=f"{ev['target']:.1f}")
        bar.update()

    start = time.perf_counter()
    result = run_federation(method, clients, ws.target(target), cfg.train, seed, log)
    bar.close()
    chosen = select_round(result.history, "bma" if method.uses_bma else "server")
    return {**key, **chosen, "comm_params_per_round": method.comm_params,
            "comm_bytes_per_round": 4 * method.comm_params, "rounds": len(result.history),
            "clients": [c.domain for c in clients], "time_s": round(time.perf_counter() - start, 2),
            "method_name": ws.cfg.methods[ws.methods.index(method)].name}


__all__ = ["run_experiment", "prepare", "method_label"]
