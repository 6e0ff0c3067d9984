"""The official-style reference router, oracle of tests/test_routing.py: it lives in the package
(trip.reference_router) because `trip bench` uses it as its naive baseline."""

from trip.reference_router import (
    capacity_constrained_assignment,
    reference_capacities,
    reference_kmeans,
    reference_route,
    reference_weights,
)

__all__ = [
    "capacity_constrained_assignment",
    "reference_capacities",
    "reference_kmeans",
    "reference_route",
    "reference_weights",
]
