"""A domain on disk (`<dataset_root>/<domain>/<class>/<image>`) and its seeded train/val split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trip.errors import TripError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@dataclass
class Domain:
    name: str
    root: Path  # the data set's folder; paths are relative to it
    paths: list[str]  # "<domain>/<class>/<file>", sorted: the order never depends on the file system
    labels: np.ndarray  # [L] int64, index into the canonical class list

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: np.ndarray) -> Domain:
        return Domain(self.name, self.root, [self.paths[i] for i in keep], self.labels[keep])


def scan_domain(dataset_root: Path, domain: str, classes: tuple[str, ...]) -> Domain:
    folder = dataset_root / domain
    if not folder.is_dir():
        raise TripError(f"domain folder missing: {folder}. Expected <root>/<domain>/<class>/<image>; "
                        f"check data.root and the domain names (`trip data list`)")
    present = {p.name for p in folder.iterdir() if p.is_dir()}
    missing = [c for c in classes if c not in present]
    extra = sorted(present - set(classes))
    if missing or extra:
        raise TripError(f"class folders of {folder} do not match the canonical class list: "
                        f"missing {missing or 'none'}, unexpected {extra or 'none'}. Rename or add the "
                        f"folders so that each class has exactly one (`trip data verify`), or set "
                        f"data.class_list: folders to take the class list from your copy's folder names")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p.name for p in (folder / cls).iterdir()
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        paths += [f"{domain}/{cls}/{name}" for name in files]
        labels += [label] * len(files)
    if not paths:
        raise TripError(f"no images found under {folder}")
    return Domain(domain, dataset_root, paths, np.asarray(labels, dtype=np.int64))


def subsample(domain: Domain, max_images: int | None, seed: int) -> Domain:
    if max_images is None or len(domain) <= max_images:
        return domain
    keep = np.sort(np.random.RandomState(seed).permutation(len(domain))[:max_images])
    return domain.subset(keep)


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The official split (docs/method.md §1.2): a seeded permutation, the first int(0.8·L) train, the next
    int(0.2·L) val. A fresh RandomState per domain, so equal-sized domains get the same permutation."""
    perm = np.random.RandomState(seed).permutation(n)
    n_train = int(n * (1 - val_fraction))
    n_val = int(n * val_fraction)
    return perm[:n_train], perm[n_train:n_train + n_val]
