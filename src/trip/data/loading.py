"""The domains of an experiment, checked before any feature is computed: folder names resolved (aliases),
DomainNet optionally restricted to its official split files, subsampled, and every image decoded once.

Unreadable images stop the run before it starts (naming them), or with `data.skip_bad_images` are left out
and counted. The decode check is cached per domain by the digest of its data root and path list, so a
second run re-opens only the files found bad before (to notice a repaired one). The cache file is checksummed
(`trip.safefile`): an altered or truncated one is ignored with a warning and the check runs again."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from trip.config import DataCfg
from trip.data.datasets import DatasetSpec
from trip.data.folder import Domain, scan_domain, subsample
from trip.data.imagecheck import find_unreadable, image_problem
from trip.errors import TripError
from trip.paths import cache_dir

SHOWN = 20  # bad files named in an error message


@dataclass
class LoadedData:
    spec: DatasetSpec  # its class list is the one the labels index
    domains: dict[str, Domain]
    skipped: dict[str, list[str]]  # domain -> relative paths left out as unreadable

    def skipped_counts(self) -> dict[str, int]:
        return {d: len(paths) for d, paths in self.skipped.items()}


def scan_domains(spec: DatasetSpec, root: Path | None, cfg: DataCfg,
                 names: list[str] | None = None) -> tuple[DatasetSpec, dict[str, Domain]]:
    """The images a run would use (of `names`, default all domains), without decoding any, and the spec
    with the class list their labels index."""
    names = list(spec.domains) if names is None else names
    if cfg.domainnet_splits == "official" and spec.name != "domain_net":
        raise TripError(f"data.domainnet_splits: official applies to domain_net only, not {spec.name}")
    if cfg.class_list == "folders":
        if root is None or not names:
            raise TripError("data.class_list: folders reads the class folders, so it needs the data on this machine")
        spec = replace(spec, classes=folder_classes(spec, root, names[0]))
    domains = {}
    for name in names:
        domain = scan(spec, root, name)
        if cfg.domainnet_splits == "official":
            domain = restrict_to_split_files(root, domain)
        domains[name] = subsample(domain, cfg.max_images_per_domain, seed=0)
    return spec, domains


def load_domains(spec: DatasetSpec, root: Path | None, cfg: DataCfg, names: list[str] | None = None) -> LoadedData:
    spec, domains = scan_domains(spec, root, cfg, names)
    bad = {name: cached_unreadable(spec.name, root, domain) for name, domain in domains.items()}
    if any(bad.values()) and not cfg.skip_bad_images:
        raise TripError(bad_images_message(bad))
    for name, problems in bad.items():
        if problems:
            print(f"note: leaving out {len(problems)} unreadable images of {name} (data.skip_bad_images): "
                  f"{', '.join(sorted(problems)[:5])}{' ...' if len(problems) > 5 else ''}", file=sys.stderr)
            domains[name] = without(domains[name], set(problems))
    return LoadedData(spec, domains, {name: sorted(problems) for name, problems in bad.items()})


def domain_folder(spec: DatasetSpec, root: Path, domain: str) -> str | None:
    return next((f for f in spec.domain_folders(domain) if (root / f).is_dir()), None)


def scan(spec: DatasetSpec, root: Path, domain: str) -> Domain:
    """`scan_domain` under whichever accepted name the domain's folder has; the domain keeps its canonical
    name, its paths the folder's real one."""
    found = domain_folder(spec, root, domain) or domain  # missing: scan_domain names the canonical folder
    scanned = scan_domain(root, found, spec.classes)
    return Domain(domain, scanned.root, scanned.paths, scanned.labels)


def folder_classes(spec: DatasetSpec, root: Path, domain: str) -> tuple[str, ...]:
    """The sorted class folder names of one domain (every other domain must match them)."""
    folder = root / (domain_folder(spec, root, domain) or domain)
    if not folder.is_dir():
        raise TripError(f"domain folder missing: {folder} (data.class_list: folders reads the class list there)")
    return tuple(sorted(p.name for p in folder.iterdir() if p.is_dir()))


def split_files(root: Path, domain: str) -> list[Path]:
    for folder in (root, root / "splits"):
        files = [folder / f"{domain}_{part}.txt" for part in ("train", "test")]
        if all(f.is_file() for f in files):
            return files
    raise TripError(f"data.domainnet_splits: official needs {domain}_train.txt and {domain}_test.txt in {root} "
                    f"(or {root / 'splits'}): `trip data download domain_net` fetches them, or get them from "
                    f"ai.bu.edu/M3SDA")


def read_split_files(files: list[Path]) -> set[str]:
    """The relative image paths the official split files list (lines `clipart/cat/x.jpg 42`)."""
    listed = set()
    for file in files:
        for number, line in enumerate(file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].isdigit():
                raise TripError(f"{file}:{number}: expected `relative/path label`, got {line!r}")
            listed.add(parts[0])
    return listed


def restrict_to_split_files(root: Path, domain: Domain) -> Domain:
    listed = read_split_files(split_files(root, domain.name))
    missing = sorted(listed - set(domain.paths))
    if missing:
        raise TripError(f"the split files of {domain.name} list {len(missing)} images missing under {root}: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. Re-extract the domain's "
                        f"zip, or set data.domainnet_splits: all")
    return domain.subset(np.asarray([i for i, p in enumerate(domain.paths) if p in listed], dtype=np.int64))


def without(domain: Domain, drop: set[str]) -> Domain:
    return domain.subset(np.asarray([i for i, p in enumerate(domain.paths) if p not in drop], dtype=np.int64))


def cached_unreadable(dataset: str, root: Path, domain: Domain) -> dict[str, str]:
    from trip import safefile  # here, so that `trip data` commands do not import torch

    digest = hashlib.sha256("\n".join([str(root.resolve()), *domain.paths]).encode()).hexdigest()
    path = cache_dir() / "imagecheck" / dataset / f"{domain.name}-{digest[:16]}-v2.json"  # v2: checksummed
    cached = _read(path, digest, len(domain))
    if cached is not None:
        rechecked = {p: image_problem(root / p) for p in cached}
        return {p: why for p, why in rechecked.items() if why is not None}
    bad = find_unreadable(root, domain.paths, desc=f"checking images of {domain.name}")
    doc = {"paths_sha256": digest, "count": len(domain), "bad": bad}
    safefile.store_in_cache(lambda: safefile.write_json(path, doc), "image check", path)
    return bad


def bad_images_message(bad: dict[str, dict[str, str]]) -> str:
    flat = [(p, why) for problems in bad.values() for p, why in sorted(problems.items())]
    counts = ", ".join(f"{d} {len(p)}" for d, p in bad.items() if p)
    lines = [f"  {p}: {why}" for p, why in flat[:SHOWN]] + ([f"  ... and {len(flat) - SHOWN} more"]
                                                           if len(flat) > SHOWN else [])
    return "\n".join([f"{len(flat)} images cannot be read ({counts}); the run did not start:", *lines,
                      "Remove or replace them, or set data.skip_bad_images: true to leave them out "
                      "(the count goes to results.json). `trip data verify` lists every problem."])


def _read(path: Path, digest: str, count: int) -> dict[str, str] | None:
    from trip import safefile

    if not path.is_file():
        return None
    try:
        doc = safefile.read_json(path)
    except safefile.BadFile as err:
        safefile.warn_rebuild("image-check cache", path, err)
        return None
    bad = doc.get("bad")
    if doc.get("paths_sha256") != digest or doc.get("count") != count or not isinstance(bad, dict):
        safefile.warn_rebuild("image-check cache", path, "it belongs to other images")
        return None
    return bad
