"""The data sets trip knows: canonical domain order and class lists (docs/method.md §1.1), and where they live."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trip.data import benchmarks as bm
from trip.data import synthetic
from trip.data.benchmarks import Archive
from trip.errors import TripError
from trip.paths import cache_dir


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    domains: tuple[str, ...]  # canonical order: defines client ids
    classes: tuple[str, ...]  # canonical order = sorted folder names = label ids
    folder_names: tuple[str, ...]  # accepted names of the data set's folder under the data root
    source: str = ""
    expected_counts: dict[str, int] = field(default_factory=dict)
    domain_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)  # other names of a domain's folder
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # per domain, where published
    counts_exact: bool = True  # False: expected_counts are of a cleaned subset of the folders (DomainNet)
    archives: tuple[Archive, ...] = ()
    licence: str = ""

    def domain_folders(self, domain: str) -> tuple[str, ...]:
        """The names a domain's folder may have on disk, canonical first."""
        return (domain, *self.domain_aliases.get(domain, ()))


DATASETS: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> None:
    DATASETS[spec.name] = spec


register(DatasetSpec(
    name="synthetic",
    domains=synthetic.DOMAINS,
    classes=synthetic.CLASSES,
    folder_names=("synthetic",),
    source="generated on this machine by trip.data.synthetic (no download)",
))
register(DatasetSpec(
    name="pacs", domains=bm.PACS_DOMAINS, classes=bm.PACS_CLASSES, folder_names=("pacs", "PACS"),
    source="Li et al., ICCV 2017; the zip TRIP's and FedCLIP's READMEs link", expected_counts=bm.PACS_COUNTS,
    class_counts=bm.PACS_CLASS_COUNTS, archives=bm.PACS_ARCHIVES,
    licence="no licence published; images collected from the web; research use",
))
register(DatasetSpec(
    name="vlcs", domains=bm.VLCS_DOMAINS, classes=bm.VLCS_CLASSES, folder_names=("vlcs", "VLCS"),
    source="Fang et al., ICCV 2013, in DomainBed's layout; the zip TRIP's README links",
    expected_counts=bm.VLCS_COUNTS, archives=bm.VLCS_ARCHIVES,
    licence="images of Caltech101, LabelMe, SUN09 and PASCAL VOC 2007, each under its own terms; research use",
))
register(DatasetSpec(
    name="office-home", domains=bm.OFFICE_HOME_DOMAINS, classes=bm.OFFICE_HOME_CLASSES,
    folder_names=("office-home", "office_home", "OfficeHomeDataset_10072016", "OfficeHome"),
    source="Venkateswara et al., CVPR 2017 (hemanthdv.org/officeHomeDataset.html); the zip TRIP's README links",
    expected_counts=bm.OFFICE_HOME_COUNTS, domain_aliases=bm.OFFICE_HOME_ALIASES,
    class_counts=bm.OFFICE_HOME_CLASS_COUNTS, archives=bm.OFFICE_HOME_ARCHIVES,
    licence="non-commercial research and educational use only (the authors' terms)",
))
register(DatasetSpec(
    name="domain_net", domains=bm.DOMAINNET_DOMAINS, classes=bm.DOMAINNET_CLASSES,
    folder_names=("domain_net", "domainnet", "DomainNet"),
    source="Peng et al., ICCV 2019 (ai.bu.edu/M3SDA): one zip per domain and the cleaned split files",
    expected_counts=bm.DOMAINNET_COUNTS, counts_exact=False, archives=bm.DOMAINNET_ARCHIVES,
    licence="research and educational use under the authors' fair-use notice",
))


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise TripError(f"data.name {name!r} is not a known data set; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_root(spec: DatasetSpec, root: str | None, images_per_class: int, seed: int, shift: float = 1.0) -> Path:
    """The folder holding `<domain>/<class>/<image>` for this data set. The synthetic set is written on
    first use, under `root` (a folder that exists) or the cache, in a folder named by its settings
    (`synthetic.folder_name`); real ones are looked up under `root` (or $TRIP_DATA) by any of their folder names."""
    if spec.name == "synthetic":
        base = Path(root).expanduser() if root else cache_dir() / "data"
        if root and not base.is_dir():  # a mistyped root must not become a new folder somewhere
            raise TripError(f"data root {base} does not exist: make that folder first, or leave --data-root and "
                            f"data.root unset to draw the synthetic set in the cache")
        return synthetic.write_domains(base, images_per_class=images_per_class, seed=seed, shift=shift)
    base_str = root or os.environ.get("TRIP_DATA")
    if not base_str:
        raise TripError(f"no data root for {spec.name}: pass --data-root DIR, set data.root, or set TRIP_DATA")
    base = Path(base_str).expanduser()
    if not base.is_dir():
        raise TripError(f"data root {base} does not exist: point --data-root / data.root at the folder "
                        f"holding {spec.folder_names[0]}/")
    for folder in spec.folder_names:
        if (base / folder).is_dir():
            return base / folder
    if all(any((base / f).is_dir() for f in spec.domain_folders(d)) for d in spec.domains):
        return base
    raise TripError(f"{base} holds no {spec.name} folder (looked for {', '.join(spec.folder_names)}); "
                    f"expected layout <root>/{spec.folder_names[0]}/<domain>/<class>/<image> "
                    f"(see `trip data list`)")
