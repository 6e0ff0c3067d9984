"""What every run of an experiment shares (`Workspace`): the backbone, the domains, their frozen inputs, and the
methods; and `prepare`, which builds it. The engines (in-process and Flower) import this module, never the
experiment runner."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import reduce

import numpy as np
import torch
import torch.nn.functional as F

from trip.backbone import Backbone, load_backbone, resolve_device
from trip.classes import ClassSplit, check_methods, class_split
from trip.config import ALL_DOMAINS, ExperimentCfg, method_label
from trip.data.datasets import DatasetSpec, dataset_root, get_dataset
from trip.data.folder import Domain, split_indices
from trip.data.holdout import in_domain_split
from trip.data.loading import load_domains
from trip.errors import TripError
from trip.features import DomainFeatures, FrozenStore, Inputs
from trip.federation.partition import client_names, few_shot, partition
from trip.federation.rounds import Client
from trip.methods import build_method, method_class
from trip.methods.base import Method, PatchRows, Split
from trip.paths import cache_dir


@dataclass
class Workspace:
    """What every run of an experiment shares: the backbone, the domains and their frozen features."""

    cfg: ExperimentCfg
    backbone: Backbone
    dataset: DatasetSpec
    domains: dict[str, Domain]
    frozen: dict[str, DomainFeatures]
    methods: list[Method]
    skipped_images: dict[str, int] = field(default_factory=dict)  # unreadable images left out, per domain
    # multidomain: each domain's in-domain test split (indices into the domain), which its clients never see
    tests: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def inputs(self) -> Inputs:
        return experiment_inputs(self.methods)

    @property
    def class_split(self) -> ClassSplit | None:
        """base2novel's base and novel classes (trip.classes); None: every class is trained and tested."""
        return class_split(self.cfg.protocol, self.dataset.classes)

    def split(self, domain: str, index) -> Split:
        """The images at `index` of `domain`, with every input the experiment's methods declared."""
        f, inputs = self.frozen[domain], self.inputs
        idx = torch.as_tensor(index, dtype=torch.int64)
        dev = self.backbone.device
        views: dict = {"features": F.normalize(f.features[idx], dim=-1).to(dev)}
        if inputs.norms:
            views["norms"] = f.features[idx].norm(dim=-1).to(dev)
        if inputs.cls:
            views["cls"] = f.cls[idx].to(dev)
        views |= {k: v[idx].to(dev) for k, v in f.routing.items()}
        if inputs.patches:
            views["patches"] = PatchRows(f.patches, idx)
        cut = self.class_split
        return Split(torch.as_tensor(self.domains[domain].labels[index]).to(dev), views, dev,
                     parts=cut.parts if cut else None)

    def clients(self, target: str, seed: int) -> list[Client]:
        """Every source client of the run, in canonical order (domain order, then client number)."""
        return [c for d in self.dataset.domains if d != target for c in self.domain_clients(d, seed)]

    def domain_clients(self, domain: str, seed: int) -> list[Client]:
        """The domain's clients (federation.clients_per_domain), each with its own seeded train/val split."""
        return [self._client(domain, name, *split) for name, split in self.client_splits(domain, seed).items()]

    def client_images(self, domain: str, seed: int) -> dict[str, np.ndarray]:
        """Client name -> the indices of its images in the domain (before data.shots_per_class)."""
        fed, pool = self.cfg.federation, self.clients_share(domain)
        parts = partition(self.domains[domain].labels[pool], fed, seed, list(self.dataset.domains).index(domain),
                          domain)
        return dict(zip(client_names(domain, fed.clients_per_domain), (pool[p] for p in parts), strict=True))

    def clients_share(self, domain: str) -> np.ndarray:
        """The indices of the domain's images its clients hold: all but its in-domain test split (multidomain)."""
        everything = np.arange(len(self.domains[domain]))
        return np.setdiff1d(everything, self.tests[domain]) if domain in self.tests else everything

    def client_splits(self, domain: str, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
        """Client name -> the indices in the domain of its train images (cut to data.shots_per_class) and of its
        validation images (whole), and the number of images it holds."""
        vf, labels = self.cfg.data.val_fraction, self.domains[domain].labels
        domain_idx = list(self.dataset.domains).index(domain)
        out = {}
        for client_no, (name, idx) in enumerate(self.client_images(domain, seed).items()):
            train_pos, val_pos = split_indices(len(idx), vf, seed)
            if not len(train_pos) or not len(val_pos):
                raise TripError(f"client {name} holds {len(idx)} images, which split into {len(train_pos)} train / "
                                f"{len(val_pos)} validation (data.val_fraction {vf}): raise "
                                f"federation.min_client_size so that each client gets both")
            train = idx[train_pos]
            if self.class_split:  # clients never see a novel class's image
                train = self.class_split.trained(labels, train)
            shots = train[few_shot(labels[train], self.cfg.data.shots_per_class, seed, domain_idx, client_no)]
            out[name] = (shots, idx[val_pos], len(idx) - len(train) + len(shots))
        return out

    def client_lists(self, seed: int, domains: list[str]) -> dict[str, dict]:
        """Client name -> its train and validation image paths (what clients.json records); under
        data.shots_per_class, also the classes of which it keeps fewer than k train images, with their count."""
        k, out = self.cfg.data.shots_per_class, {}
        for d in domains:
            paths, labels = self.domains[d].paths, self.domains[d].labels
            for name, (train, val, _) in self.client_splits(d, seed).items():
                out[name] = {"train": [paths[i] for i in train], "val": [paths[i] for i in val]}
                if k is not None:
                    counts = np.bincount(labels[train], minlength=len(self.dataset.classes))
                    trained = self.class_split.base if self.class_split else range(len(counts))
                    out[name]["classes_under_shots"] = {self.dataset.classes[c]: int(counts[c]) for c in trained
                                                        if counts[c] < k}
        return out

    def _client(self, domain: str, name: str, train: np.ndarray, val: np.ndarray, images: int) -> Client:
        weight = images if self.cfg.train.fedavg_weight == "images" else len(train)
        train_split = self.split(domain, train)
        if self.class_split:  # scored among the base classes only
            train_split = train_split.of_classes(self.class_split.base)
        return Client(name, train_split, self.split(domain, val), weight)

    def target(self, name: str) -> Split:
        return self.split(name, list(range(len(self.domains[name]))))

    def in_domain_tests(self) -> dict[str, Split]:
        """multidomain: each domain's in-domain test split, in the data set's domain order."""
        return {d: self.split(d, self.tests[d]) for d in self.dataset.domains if d in self.tests}

    def evaluation(self, target: str) -> Split | dict[str, Split]:
        """What a run is tested on: its held-out domain, or (multidomain) every domain's in-domain test split."""
        return self.in_domain_tests() if target == ALL_DOMAINS else self.target(target)


def targets_of(cfg: ExperimentCfg, spec: DatasetSpec) -> list[str]:
    """The runs' `target`s: each held-out domain, or ALL_DOMAINS alone (multidomain: no domain is held out)."""
    if cfg.protocol == "multidomain":
        return [ALL_DOMAINS]
    if cfg.data.targets == "all":
        return list(spec.domains)
    unknown = [t for t in cfg.data.targets if t not in spec.domains]
    if unknown:
        raise TripError(f"data.targets: {unknown} are not domains of {spec.name} ({', '.join(spec.domains)})")
    return list(cfg.data.targets)


def prepare(cfg: ExperimentCfg, only: list[str] | None = None) -> Workspace:
    """`only`: load just these domains (a Flower SuperNode holds one; a ServerApp may need none)."""
    spec = get_dataset(cfg.data.name)
    targets_of(cfg, spec)
    names = [d for d in spec.domains if only is None or d in only]
    root = dataset_root(spec, cfg.data.root, cfg.data.images_per_class, seed=0, shift=cfg.data.shift) if names else None
    data = load_domains(spec, root, cfg.data, names)  # refuses unreadable images unless data.skip_bad_images
    spec, domains = data.spec, data.domains
    tests = in_domain_tests(cfg, domains)
    problems = split_problems(cfg, spec, {d: len(dom) - len(tests.get(d, ())) for d, dom in domains.items()})
    if problems:
        raise TripError("\n  ".join(["a domain's split is empty, so the runs cannot train or select a round:",
                                        *problems]))
    check_protocol(cfg, spec)
    device = resolve_device(cfg.device)
    backbone = load_backbone(cfg.backbone, device)
    methods = [build_method(m, backbone, spec.classes) for m in cfg.methods]
    store = FrozenStore(backbone, cache_dir())
    frozen = {d: store.load(spec.name, dom, experiment_inputs(methods)) for d, dom in domains.items()}
    return Workspace(cfg, backbone, spec, domains, frozen, methods, data.skipped_counts(), tests)


def in_domain_tests(cfg: ExperimentCfg, domains: dict[str, Domain]) -> dict[str, np.ndarray]:
    """multidomain: each domain's in-domain test split (`data/holdout.py`); none otherwise."""
    if cfg.protocol != "multidomain":
        return {}
    official = cfg.data.domainnet_splits == "official"
    return {d: in_domain_split(dom, cfg.data.test_fraction, official)[1] for d, dom in domains.items()}


def check_protocol(cfg: ExperimentCfg, spec: DatasetSpec) -> None:
    """Refuses a protocol the data set or a method cannot run (`trip.classes`)."""
    class_split(cfg.protocol, spec.classes)
    check_methods(cfg.protocol, {method_label(m): method_class(m).novel_classes for m in cfg.methods})


def split_problems(cfg: ExperimentCfg, spec: DatasetSpec, sizes: dict[str, int]) -> list[str]:
    """What makes a run meaningless before it starts: a domain with no images, or a source domain (a client of
    some run) whose train or validation split is empty. `sizes`: images per domain its clients share."""
    targets = targets_of(cfg, spec)
    vf = cfg.data.val_fraction
    problems: dict[str, list[str]] = {}  # problem -> the domains that have it
    for domain, n in sizes.items():
        train, val = (len(part) for part in split_indices(n, vf, seed=0))  # the sizes do not depend on the seed
        if n == 0:
            problems.setdefault("no images left to use", []).append(domain)
        elif (not train or not val) and any(t != domain for t in targets):
            empty = "train split is empty: a client with nothing to train on" if not train else \
                "validation split is empty: no validation accuracy to select a round by"
            problems.setdefault(f"{n} images split into {train} train / {val} validation (data.val_fraction {vf}); "
                                f"the {empty}. {_more_images(cfg, spec, n)}", []).append(domain)
    return [f"{', '.join(domains)}: {problem}" for problem, domains in problems.items()]


def _more_images(cfg: ExperimentCfg, spec: DatasetSpec, n: int) -> str:
    """The settings that give every split at least one image."""
    vf = cfg.data.val_fraction
    # The smallest domain split_indices gives an image in each part: int(m·(1−vf)) ≥ 1 and int(m·vf) ≥ 1.
    need = next(m for m in itertools.count(max(1, int(1 / min(vf, 1 - vf)) - 1))
                if int(m * (1 - vf)) >= 1 and int(m * vf) >= 1)
    limit = cfg.data.max_images_per_domain
    if limit is not None and limit < need:
        fix = f"Set data.max_images_per_domain to at least {need}"
    elif spec.name == "synthetic":
        fix = f"Set data.images_per_class to at least {-(-need // len(spec.classes))}"
    else:
        fix = f"The domain needs at least {need} images (it has {n})"
    return f"{fix}, or change data.val_fraction."


def experiment_inputs(methods: list[Method]) -> Inputs:
    """The union of the frozen inputs the methods declare."""
    return reduce(lambda a, b: a | b, (m.inputs() for m in methods), Inputs())
