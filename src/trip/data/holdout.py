"""The in-domain test split of a domain under `protocol: multidomain` (docs/reproduce.md, "Multi-domain"): a part
of every domain that no client trains or validates on. Either a seeded share of its images (`data.test_fraction`)
or, for DomainNet with `data.domainnet_splits: official`, the images its `<domain>_test.txt` lists.

The split is a property of the benchmark, not of a run: it is seeded by a constant (never by the run's seed), so
every seed, method and engine tests on the same images, as with the official split files."""

from __future__ import annotations

import numpy as np

from trip.data.folder import Domain
from trip.data.loading import read_split_files, split_files
from trip.errors import TripError

TEST_SPLIT_SEED = 0


def in_domain_split(domain: Domain, test_fraction: float, official: bool) -> tuple[np.ndarray, np.ndarray]:
    """(the indices the domain's clients share, the indices of its test split), both sorted and disjoint."""
    if official:
        listed = read_split_files(split_files(domain.root, domain.name)[1:])
        is_test = np.asarray([p in listed for p in domain.paths], dtype=bool)
        rest, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        how = f"the images {domain.name}_test.txt lists"
    else:
        perm = np.random.RandomState(TEST_SPLIT_SEED).permutation(len(domain))
        n_test = int(len(domain) * test_fraction)
        rest, test = np.sort(perm[n_test:]), np.sort(perm[:n_test])
        how = f"data.test_fraction {test_fraction:g} of its {len(domain)} images"
    if not len(test) or not len(rest):
        side = "test split" if not len(test) else "clients' share"
        raise TripError(f"{domain.name}: the in-domain {side} is empty ({how}: {len(test)} test, {len(rest)} for "
                        f"the clients): use more images or change data.test_fraction")
    return rest, test
