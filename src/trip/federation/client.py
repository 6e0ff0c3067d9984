"""What a client does in a round: train the communicated tensors locally from the global ones, and
measure accuracy. The same functions serve the in-process engine and the Flower ClientApp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trip.config import TrainCfg
from trip.errors import TripError
from trip.federation.optim import make_optimizer
from trip.methods.base import Method, Split


class NonFiniteError(TripError):
    """A client's loss or parameters became NaN/inf: its update is dropped, the global state is untouched."""


@dataclass
class ClientUpdate:
    params: dict[str, torch.Tensor]  # the communicated tensors after local training
    loss: float  # mean training loss over the round's steps


def round_seed(seed: int, round_idx: int, client_idx: int) -> int:
    """Seeds a client's batch order in a round: independent of the engine and of other clients."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_idx) % (2**63)


def client_update(method: Method, global_params: dict[str, torch.Tensor], train: Split, cfg: TrainCfg,
                  lr: float, seed: int, *, where: str = "client") -> ClientUpdate:
    """Local epochs from the global params with train's AdamW, or the method's own optimizer where its config
    names one; a new optimizer every round (spec B3)."""
    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in global_params.items()}
    opt = make_optimizer(params.values(), cfg, getattr(method.cfg, "optimizer", None), lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(cfg.local_epochs):
        order = torch.randperm(len(train), generator=gen)
        for step, start in enumerate(range(0, len(train), cfg.batch_size)):
            batch = train.take(order[start:start + cfg.batch_size].to(train.labels.device))
            loss = method.loss(params, batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at {where}, epoch {epoch}, step {step}: "
                                f"the global state was not changed. Lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    out = {k: v.detach() for k, v in params.items()}
    if not all(torch.isfinite(v).all() for v in out.values()):
        raise NonFiniteError(f"non-finite parameters after local training at {where}: update discarded")
    return ClientUpdate(out, sum(losses) / max(1, len(losses)))


@torch.no_grad()
def accuracy(method: Method, params: dict[str, torch.Tensor], split: Split) -> float:
    """Top-1 accuracy in %, micro-averaged over the split's images."""
    if len(split) == 0:
        return math.nan
    correct = 0
    for start in range(0, len(split), method.eval_batch_size):
        batch = split.take(slice(start, start + method.eval_batch_size))
        correct += (method.logits(params, batch).argmax(-1) == batch.labels).sum().item()
    return 100.0 * correct / len(split)
