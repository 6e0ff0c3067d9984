"""The server's side of a round: size-weighted FedAvg of the communicated tensors (fp32), and the Beta
moving average (BMA) of the global tensors that the official code selects and saves (docs/method.md §6.2)."""

from __future__ import annotations

import torch
from scipy.stats import beta as beta_dist


def fedavg_weights(sizes: list[int]) -> list[float]:
    """a_k = n_k / Σ n, in float64 as the official server computes them (`data_size / total`)."""
    total = sum(sizes)
    return [n / total for n in sizes]


def fedavg(params: list[dict[str, torch.Tensor]], sizes: list[int]) -> dict[str, torch.Tensor]:
    weights = fedavg_weights(sizes)
    return {k: sum(p[k].float() * a for p, a in zip(params, weights, strict=True)) for k in params[0]}


def bma_weights(rounds: int, shape: float = 0.2) -> list[float]:
    """b(t) = pdf_Beta(β,β)((t + 0.5) / (R + 1)) for t = 0..R-1; the init gets b(0) as prior weight."""
    return [float(beta_dist.pdf((t + 0.5) / (rounds + 1), shape, shape)) for t in range(rounds)]


class BMA:
    """BMA ← (W·BMA + b(t)·G_t)/(W + b(t)), W ← W + b(t). With include_init the random initial
    tensors keep prior weight b(0) (the official behaviour: 17.9 % of the mass after 15 rounds)."""

    def __init__(self, init: dict[str, torch.Tensor], rounds: int, shape: float = 0.2,
                 include_init: bool = True):
        self.b = bma_weights(rounds, shape)
        self.params = {k: v.detach().clone().float() for k, v in init.items()}
        self.total = self.b[0] if include_init else 0.0

    def update(self, global_params: dict[str, torch.Tensor], round_idx: int) -> None:
        b = self.b[round_idx]
        self.params = {k: (self.total * self.params[k] + b * global_params[k].float()) / (self.total + b)
                       for k in self.params}
        self.total += b
