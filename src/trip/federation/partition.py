"""How a source domain's images are dealt to its K clients (`federation.partition`), seeded by the run's seed and
the domain's place in the data set, so every engine and every process forms the same clients."""

from __future__ import annotations

import numpy as np

from trip.config import FederationCfg
from trip.errors import TripError

DIRICHLET_TRIES = 100  # fresh draws before a Dirichlet split that misses the minimum client size is refused


def client_names(domain: str, k: int) -> list[str]:
    """`photo` for one client per domain (the records of a domain-per-client run do not change), else
    `photo/0` .. `photo/K-1`."""
    return [domain] if k == 1 else [f"{domain}/{i}" for i in range(k)]


def client_domain(name: str) -> str:
    """The domain of the client `name` (`client_names`' inverse)."""
    return name.split("/")[0]


def partition(labels: np.ndarray, fed: FederationCfg, seed: int, domain_idx: int, domain: str) -> list[np.ndarray]:
    """The image indices (sorted) of each of the domain's clients. K = 1: the whole domain, in its order."""
    n, k = len(labels), fed.clients_per_domain
    if k == 1:
        return [np.arange(n)]
    if n < k * fed.min_client_size:
        raise TripError(f"{domain} has {n} images, too few for {k} clients of at least {fed.min_client_size} "
                        f"(federation.min_client_size): lower federation.clients_per_domain or "
                        f"federation.min_client_size, or use more images")
    rng = np.random.default_rng([seed, domain_idx])
    if fed.partition == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n), k)]
    for _ in range(DIRICHLET_TRIES):
        parts = _dirichlet(labels, k, fed.dirichlet_alpha, rng)
        if min(len(p) for p in parts) >= fed.min_client_size:
            return parts
    raise TripError(f"{domain}: {DIRICHLET_TRIES} Dirichlet draws (alpha {fed.dirichlet_alpha:g}) of its {n} "
                    f"images over {k} clients all left a client with fewer than {fed.min_client_size} images "
                    f"(federation.min_client_size): raise federation.dirichlet_alpha, lower "
                    f"federation.clients_per_domain or federation.min_client_size")


def _dirichlet(labels: np.ndarray, k: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Each class's images dealt to the clients in proportions drawn from Dirichlet(alpha, ..., alpha)."""
    parts: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        cuts = (np.cumsum(rng.dirichlet(np.full(k, alpha))) * len(idx)).astype(int)[:-1]
        for client, share in enumerate(np.split(idx, cuts)):
            parts[client].append(share)
    return [np.sort(np.concatenate(p)) for p in parts]


def few_shot(labels: np.ndarray, k: int | None, seed: int, domain_idx: int, client_no: int) -> np.ndarray:
    """The positions (sorted) of the train images a client keeps under `data.shots_per_class` = k: k of each
    class, drawn per client and seed; a class with fewer keeps all it has. Grouped by the label itself, not by
    matching class names in paths as the official code does (docs/method.md §1.2). None: all."""
    if k is None:
        return np.arange(len(labels))
    rng = np.random.default_rng([seed, domain_idx, client_no])
    kept = [rng.permutation(np.flatnonzero(labels == cls))[:k] for cls in np.unique(labels)]
    return np.sort(np.concatenate(kept)) if kept else np.arange(0)
