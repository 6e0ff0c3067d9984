"""What a client does in a round: train the communicated tensors (and its private ones) locally from the global
ones, and measure accuracy. The same functions serve the in-process engine and the Flower ClientApp."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trip.config import TrainCfg
from trip.errors import TripError
from trip.federation.optim import make_optimizer
from trip.methods.base import Method, Split, Tensors


class NonFiniteError(TripError):
    """A client's loss or parameters became NaN/inf: its update is dropped, the global state is untouched."""


@dataclass
class ClientUpdate:
    params: Tensors  # the communicated tensors after local training
    private: Tensors  # the client's private tensors after local training (they never travel)
    loss: float  # mean training loss over the round's steps


def _leaves(tensors: Tensors) -> Tensors:
    return {k: v.detach().clone().float().requires_grad_(True) for k, v in tensors.items()}


def client_update(method: Method, global_params: Tensors, train: Split, cfg: TrainCfg, lr: float, seed: int, *,
                  private: Tensors | None = None, where: str = "client") -> ClientUpdate:
    """Local epochs from the global params (and the client's private ones) with the method's optimizer (train's
    AdamW by default); a new optimizer every round, as the official code. A private tensor the method's loss
    does not differentiate (e.g. one it detaches) gets no gradient and stays as it is."""
    shared, own = _leaves(global_params), _leaves(private or {})
    opt = make_optimizer([*shared.values(), *own.values()], cfg, method.optimizer(), lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for epoch in range(cfg.local_epochs):
        order = torch.randperm(len(train), generator=gen)
        for step, start in enumerate(range(0, len(train), cfg.batch_size)):
            batch = train.take(order[start:start + cfg.batch_size].to(train.labels.device))
            loss = method.loss(shared | own, batch)
            if not torch.isfinite(loss):
                raise NonFiniteError(f"non-finite loss ({loss.item()}) at {where}, epoch {epoch}, step {step}: "
                                f"the global state was not changed. Lower train.lr or check the data")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    out, kept = ({k: v.detach() for k, v in d.items()} for d in (shared, own))
    if not all(torch.isfinite(v).all() for v in [*out.values(), *kept.values()]):
        raise NonFiniteError(f"non-finite parameters after local training at {where}: update discarded")
    return ClientUpdate(out, kept, sum(losses) / max(1, len(losses)))


@torch.no_grad()
def accuracy(method: Method, params: Tensors, split: Split) -> float:
    """Top-1 accuracy in %, micro-averaged over the split's images, of the deployed model `params`."""
    if len(split) == 0:
        return math.nan
    correct = 0
    columns = len(method.class_names) if split.classes is None else len(split.classes)
    for start in range(0, len(split), method.eval_batch_size):
        batch = split.take(slice(start, start + method.eval_batch_size))
        logits = method.logits(params, batch)
        if logits.shape[-1] != columns:
            raise TripError(f"{method.label} scored {logits.shape[-1]} classes on a split of {columns}: a method "
                            f"that sets novel_classes must score a batch among its Split.classes only")
        correct += (logits.argmax(-1) == batch.labels).sum().item()
    return 100.0 * correct / len(split)
