"""The local optimizer of a round: AdamW with `train`'s settings, or the one a method declares (e.g. FedCLIP's
Adam, an SGD with momentum)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from trip.config import OptimizerCfg, TrainCfg


def make_optimizer(params: Iterable[torch.Tensor], train: TrainCfg, own: OptimizerCfg | None,
                   lr: float) -> torch.optim.Optimizer:
    """`lr` is the round's lr from train's schedule (train.lr · lr_decay^r). A method's own lr keeps that
    schedule's decay: own.lr · lr / train.lr. Unset fields of `own` fall back to `train`'s."""
    own = own or OptimizerCfg()
    lr = lr if own.lr is None else own.lr * lr / train.lr
    weight_decay = train.weight_decay if own.weight_decay is None else own.weight_decay
    if own.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=own.momentum, weight_decay=weight_decay)
    kind = torch.optim.Adam if own.name == "adam" else torch.optim.AdamW
    return kind(params, lr=lr, betas=own.betas or train.betas, eps=own.eps or train.eps, weight_decay=weight_decay)
