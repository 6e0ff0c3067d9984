"""The data sets trip knows: canonical domain order and class lists (spec §1.1), and where they live."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from trip.data import synthetic
from trip.errors import TripError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    domains: tuple[str, ...]  # canonical order: defines client ids
    classes: tuple[str, ...]  # canonical order = sorted folder names = label ids
    folder_names: tuple[str, ...]  # accepted names of the data set's folder under the data root
    source: str = ""
    expected_counts: dict[str, int] = field(default_factory=dict)


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


def get_dataset(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise TripError(f"data.name {name!r} is not a known data set; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def dataset_root(spec: DatasetSpec, root: str | None, images_per_class: int, seed: int) -> Path:
    """The folder holding `<domain>/<class>/<image>` for this data set. The synthetic set is written on
    first use; real ones are looked up under `root` (or $TRIP_DATA) by any of their folder names."""
    if spec.name == "synthetic":
        from trip.backbone import cache_dir

        base = Path(root) if root else cache_dir() / "data"
        return synthetic.write_domains(base, images_per_class=images_per_class, seed=seed)
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
    if all((base / d).is_dir() for d in spec.domains):
        return base
    raise TripError(f"{base} holds no {spec.name} folder (looked for {', '.join(spec.folder_names)}); "
                    f"expected layout <root>/{spec.folder_names[0]}/<domain>/<class>/<image> "
                    f"(see `trip data list`)")
