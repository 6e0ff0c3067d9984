"""Published numbers to compare our runs with: top-1 accuracy (%) per held-out domain and the average,
keyed by (data set, method label). Only Office-Home is published in the official repository (its README,
a copy of the paper's table; docs/method.md §9.1): CLIP ViT-B/16, leave-one-domain-out, one run per cell."""

from __future__ import annotations

SOURCE = "TRIP paper (arXiv 2504.21063), Office-Home table as in the official README (docs/method.md §9.1)"

_OFFICEHOME_DOMAINS = ("Art", "Clipart", "Product", "Real_World")
_OFFICEHOME = {  # method: (Art, Clipart, Product, Real_World, avg)
    "fedclip": (78.45, 64.77, 87.68, 87.84, 79.69),
    "promptfl": (80.75, 69.88, 90.96, 90.25, 82.96),
    "fedotp": (81.16, 70.23, 90.98, 90.82, 83.30),
    "fedapt": (82.96, 70.98, 91.33, 90.51, 83.94),
    "trip-lite": (84.21, 70.19, 92.34, 91.41, 84.53),
    "trip": (85.49, 71.22, 92.97, 91.79, 85.37),
}

PAPER: dict[tuple[str, str], dict[str, float]] = {
    ("office-home", method): {**dict(zip(_OFFICEHOME_DOMAINS, accs[:-1])), "avg": accs[-1]}
    for method, accs in _OFFICEHOME.items()
}

# Parameters communicated per round as the paper's table prints them.
PAPER_COMM = {"fedclip": "0.524M", "promptfl": "0.008M", "fedotp": "0.008M", "fedapt": "0.534M",
              "trip-lite": "0.001M", "trip": "0.065M"}


def published(dataset: str, method: str) -> dict[str, float] | None:
    return PAPER.get((dataset, method))
