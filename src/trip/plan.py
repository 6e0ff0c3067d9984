"""`trip run CONFIG --dry-run`: validate a config, check the data it names and print what it would run (runs,
clients, images per split, parameters communicated per round) without building a backbone, decoding an image
or training anything."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip

from trip.classes import ClassSplit, class_split
from trip.config import BackboneCfg, ExperimentCfg, method_label, names_a_weights_file
from trip.data.datasets import DatasetSpec, dataset_root, get_dataset
from trip.data.folder import Domain, split_indices, subsample
from trip.data.holdout import in_domain_split
from trip.data.loading import scan_domains
from trip.errors import TripError
from trip.federation.partition import few_shot, partition
from trip.methods import comm_params, upload_params
from trip.results import text_table
from trip.tinyclip import TINY_CFG
from trip.workspace import check_protocol, split_problems, targets_of


@dataclass
class DomainPlan:
    images: int  # after data.max_images_per_domain
    train: int
    val: int
    clients: list[tuple[int, int]]  # each client's (train, val) images, for the config's first seed
    test: int = 0  # multidomain: the domain's in-domain test split


@dataclass
class Plan:
    cfg: ExperimentCfg
    dataset: DatasetSpec
    data_where: str
    domains: dict[str, DomainPlan]
    targets: list[str]
    weights: str
    widths: tuple[int, int]  # (text, vision)
    params: dict[str, int]  # method label -> parameters one client sends per round
    warnings: list[str]
    uploads: dict[str, int]  # method label -> parameters one client uploads once, for the target prediction

    @property
    def runs(self) -> int:
        return len(self.cfg.seeds) * len(self.cfg.methods) * len(self.targets)


def make_plan(cfg: ExperimentCfg) -> Plan:
    spec = get_dataset(cfg.data.name)
    targets = targets_of(cfg, spec)
    widths = backbone_widths(cfg.backbone)
    weights = describe_weights(cfg.backbone)
    spec, where, scanned, warnings = _scan(cfg, spec)
    check_protocol(cfg, spec)
    cut = class_split(cfg.protocol, spec.classes)
    labels = {d: dom.labels for d, dom in scanned.items()}
    domains = {d: _split_sizes(cfg, dom, list(spec.domains).index(d), cut) for d, dom in scanned.items()}
    warnings += [f"{d}: {n} of {len(spec.classes)} classes have no images" for d, lab in labels.items()
                 if (n := int((np.bincount(lab, minlength=len(spec.classes)) == 0).sum()))]
    warnings += split_problems(cfg, spec, {d: p.images - p.test for d, p in domains.items()})
    params = {method_label(m): comm_params(m, *widths, len(spec.classes)) for m in cfg.methods}
    uploads = {method_label(m): upload_params(m, *widths, len(spec.classes)) for m in cfg.methods}
    return Plan(cfg, spec, where, domains, targets, weights, widths, params, warnings, uploads)


def backbone_widths(cfg: BackboneCfg) -> tuple[int, int]:
    """(text width, vision width) read from the model config: nothing is built or loaded."""
    model_cfg = TINY_CFG if cfg.name == "tiny" else open_clip.get_model_config(cfg.name)
    if model_cfg is None:
        raise TripError(f"backbone.name {cfg.name!r} is not an open_clip model (nor 'tiny'); "
                        f"e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    return model_cfg["text_cfg"]["width"], model_cfg["vision_cfg"]["width"]


def describe_weights(cfg: BackboneCfg) -> str:
    """What backbone.pretrained names, after the checks that need no loading (a file exists, a tag is known)."""
    tag = cfg.pretrained
    if tag is None:
        return "random weights"
    if cfg.name == "tiny" and tag == "synthetic":
        return "pretrained on synthetic captions (cached after the first run)"
    path = Path(tag).expanduser()
    if cfg.name == "tiny" or names_a_weights_file(tag):
        if not path.is_file():
            raise TripError(f"backbone.pretrained: no weights file at {path}; see docs/reproduce.md")
        return f"file {path}"
    if tag not in open_clip.list_pretrained_tags_by_model(cfg.name):
        raise TripError(f"backbone.pretrained {tag!r} is not an open_clip tag of {cfg.name}; known: "
                        f"{', '.join(open_clip.list_pretrained_tags_by_model(cfg.name))}")
    return f"open_clip tag {tag!r} (needs the hub or its cache; offline, a local file: docs/reproduce.md)"


def _scan(cfg: ExperimentCfg, spec: DatasetSpec) -> tuple[DatasetSpec, str, dict[str, Domain], list[str]]:
    """The spec whose class list the labels index, where the data is, each domain's images as a run would use
    them (found and subsampled, not decoded), and warnings."""
    if spec.name == "synthetic":  # written on first use: nothing on disk to check yet
        labels = np.repeat(np.arange(len(spec.classes)), cfg.data.images_per_class)  # sorted as the files are
        domains = {d: subsample(Domain(d, Path(), [""] * len(labels), labels), cfg.data.max_images_per_domain, 0)
                   for d in spec.domains}
        return spec, "generated on the first run", domains, []
    root = dataset_root(spec, cfg.data.root, cfg.data.images_per_class, seed=0, shift=cfg.data.shift)
    spec, domains = scan_domains(spec, root, cfg.data)
    warnings = []
    if spec.counts_exact and cfg.data.max_images_per_domain is None:
        warnings = [f"{d}: {len(dom):,} images; the standard release has {spec.expected_counts[d]:,}"
                    for d, dom in domains.items() if spec.expected_counts.get(d, len(dom)) != len(dom)]
    return spec, str(root), domains, warnings


def _split_sizes(cfg: ExperimentCfg, domain: Domain, domain_idx: int, cut: ClassSplit | None) -> DomainPlan:
    """The split sizes do not depend on the seed; a Dirichlet partition's client sizes and a few-shot client's
    train size do (the first seed's). Under base2novel (`cut`) the train sizes count base-class images only; under
    multidomain the clients share what the in-domain test split leaves."""
    vf, seed = cfg.data.val_fraction, cfg.seeds[0]
    share, test = _share_and_test(cfg, domain)
    labels = domain.labels[share]
    train, val = split_indices(len(labels), vf, seed=0)
    clients = []
    for client_no, idx in enumerate(partition(labels, cfg.federation, seed, domain_idx, domain.name)):
        train_pos, val_pos = split_indices(len(idx), vf, seed)
        trained = cut.trained(labels, idx[train_pos]) if cut else idx[train_pos]
        shots = few_shot(labels[trained], cfg.data.shots_per_class, seed, domain_idx, client_no)
        clients.append((len(shots), len(val_pos)))
    return DomainPlan(len(domain), len(cut.trained(labels, train) if cut else train), len(val), clients, len(test))


def _share_and_test(cfg: ExperimentCfg, domain: Domain) -> tuple[np.ndarray, np.ndarray]:
    """(the images the domain's clients share, its in-domain test split): all and none outside multidomain."""
    if cfg.protocol != "multidomain":
        return np.arange(len(domain)), np.arange(0)
    return in_domain_split(domain, cfg.data.test_fraction, cfg.data.domainnet_splits == "official")


def format_plan(plan: Plan) -> str:
    cfg, spec = plan.cfg, plan.dataset
    t, f = cfg.train, cfg.federation
    in_domain = cfg.protocol == "multidomain"
    domains = [[d, f"{p.images:,}", f"{p.train:,}", f"{p.val:,}", *([f"{p.test:,}"] if in_domain else [])]
               for d, p in plan.domains.items()]
    runs_of = "multidomain run(s) (no domain held out)" if in_domain else "held-out domain(s)"
    sources = len(spec.domains) - (0 if in_domain else 1)
    methods = [[label, f"{n:,}", f"{4 * n:,}", f"{plan.uploads[label]:,}"] for label, n in plan.params.items()]
    lines = [
        f"Dry run of '{cfg.name}': the config is valid and the data checks passed; nothing was trained.",
        "",
        f"backbone  {cfg.backbone.name} (text width {plan.widths[0]}, vision width {plan.widths[1]})",
        f"weights   {plan.weights}",
        f"data      {spec.name}: {plan.data_where} ({len(spec.domains)} domains, {len(spec.classes)} classes)",
        "",
        _indent(text_table(["domain", "images", "train", "val", *(["test"] if in_domain else [])], domains)),
        "",
        f"runs      {len(cfg.seeds)} seed(s) {cfg.seeds} × {len(cfg.methods)} method(s) × {len(plan.targets)} "
        f"{runs_of} = {plan.runs} runs; {sources * f.clients_per_domain} clients per run; "
        f"{t.rounds} rounds × {t.local_epochs} local epoch(s), batch {t.batch_size}",
        f"clients   {_federation(cfg)}",
        *_classes_line(plan),
        *([f"few-shot  {cfg.data.shots_per_class} train image(s) per class per client (fewer where a class has "
           f"fewer); validation and held-out sets whole"] if cfg.data.shots_per_class else []),
        "",
        _in_domain_table(plan) if in_domain else _held_out_table(plan),
        "",
        _indent(text_table(["method", "params/round", "bytes/round (fp32)", "params once"], methods)),
        "  (sent by each client per round, and received back from the server; \"once\": uploaded by each client",
        "  once, at the end, for the prediction on the held-out domain)",
    ]
    if plan.warnings:
        lines += ["", "warnings", *(f"  - {w}" for w in plan.warnings)]
    return "\n".join(lines)


def _classes_line(plan: Plan) -> list[str]:
    cut = class_split(plan.cfg.protocol, plan.dataset.classes)
    if cut is None:
        return []
    names = cut.names(plan.dataset.classes)
    return [f"classes   base2novel: clients train on the {len(cut.base)} base classes ({', '.join(names['base'])}); "
            f"validation and held-out sets are scored on them and on the {len(cut.novel)} novel ones "
            f"({', '.join(names['novel'])})"]


def _held_out_table(plan: Plan) -> str:
    """One line per run's held-out domain: its size (the test set) and the clients' train/val sizes."""
    width = max(len("held out"), *map(len, plan.targets))
    lines = [f"{'held out':<{width}}  target images  clients (train/val images)"]
    for target in plan.targets:
        clients = ", ".join(f"{d} {_client_sizes(p)}" for d, p in plan.domains.items() if d != target)
        lines.append(f"{target:<{width}}  {plan.domains[target].images:>13,}  {clients}")
    return _indent("\n".join(lines))


def _in_domain_table(plan: Plan) -> str:
    """multidomain: one line per domain, its in-domain test split and its clients' train/val sizes."""
    width = max(len("domain"), *map(len, plan.domains))
    lines = [f"{'domain':<{width}}  test images  clients (train/val images)"]
    lines += [f"{d:<{width}}  {p.test:>11,}  {_client_sizes(p)}" for d, p in plan.domains.items()]
    return _indent("\n".join(lines))


def _client_sizes(p: DomainPlan) -> str:
    if len(p.clients) == 1:
        return f"{p.clients[0][0]:,}/{p.clients[0][1]:,}"
    (t_lo, v_lo), (t_hi, v_hi) = (tuple(fn(c[i] for c in p.clients) for i in (0, 1)) for fn in (min, max))
    return f"{len(p.clients)} × {t_lo}–{t_hi}/{v_lo}–{v_hi}"


def _federation(cfg: ExperimentCfg) -> str:
    f = cfg.federation
    split = "the whole domain" if f.clients_per_domain == 1 else \
        f"{f.partition}" + (f" (alpha {f.dirichlet_alpha:g})" if f.partition == "dirichlet" else "") + \
        f", at least {f.min_client_size} images each"
    secure = f"; secure aggregation (SecAgg+, threshold {f.secagg.reconstruction_threshold:g} of "\
        f"{f.secagg.num_shares:g} shares)" if f.secure_aggregation else ""
    return (f"{f.clients_per_domain} per source domain ({split}); fraction {f.fraction:g} sampled per round, "
            f"drop rate {f.drop_rate:g}{secure}")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())
