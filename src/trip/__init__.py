"""trip: TRIP and baselines for federated domain generalization with prompt learning on a frozen CLIP."""

__version__ = "0.1.0"
