"""Precision policy: fp32 master parameters, logits and loss; the text encoder runs under
trip.backbone.autocast, bf16 on GPU and a no-op on CPU, where results are bit-identical without it."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import trip.methods.promptfl as promptfl_module
import trip.methods.trip as trip_module
from trip.backbone import autocast
from trip.config import PromptFLCfg, TrainCfg, TripCfg
from trip.federation.client import client_update
from trip.methods import build_method
from trip.methods.base import Split

CLASSES = ("circle", "square", "tennis_racket")
METHODS = [TripCfg(name="trip", n_ctx=4, teacher="single"), PromptFLCfg(name="promptfl", n_ctx=4)]


def _split(method, n: int = 6) -> Split:
    bb = method.backbone
    g = torch.Generator().manual_seed(0)
    routing = {}
    for spec in method.inputs().routing:
        w = torch.rand(n, spec.num_experts, generator=g)
        routing[spec.key()] = w / w.sum(-1, keepdim=True)
    feats = F.normalize(torch.randn(n, bb.model.text_projection.shape[1], generator=g), dim=-1)
    return Split(torch.arange(n) % len(CLASSES),
                 {"features": feats, "cls": torch.randn(n, bb.vision_width, generator=g), **routing})


def _results(method, split: Split) -> list[torch.Tensor]:
    params = {k: v.requires_grad_(True) for k, v in method.init_params(seed=3).items()}
    loss = method.loss(params, split)
    grads = torch.autograd.grad(loss, list(params.values()))
    with torch.no_grad():
        logits = method.logits(params, split)
    assert loss.dtype == logits.dtype == torch.float32
    return [loss.detach(), logits, *grads]


def test_autocast_is_a_no_op_on_cpu():
    with autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 3) @ torch.ones(3, 2)).dtype == torch.float32


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_methods_identical_with_and_without_autocast_on_cpu(tiny_backbone, cfg, monkeypatch):
    method = build_method(cfg, tiny_backbone, CLASSES)
    split = _split(method)
    with_autocast = _results(method, split)
    for module in (trip_module, promptfl_module):
        monkeypatch.setattr(module, "autocast", lambda device: contextlib.nullcontext())
    without = _results(method, split)
    assert all(torch.equal(a, b) for a, b in zip(with_autocast, without, strict=True))


@pytest.mark.parametrize("cfg", METHODS, ids=lambda c: c.name)
def test_master_parameters_stay_fp32(tiny_backbone, cfg):
    method = build_method(cfg, tiny_backbone, CLASSES)
    init = {k: v.half() for k, v in method.init_params(seed=1).items()}  # e.g. a fidelity-mode global state
    update = client_update(method, init, _split(method), TrainCfg(batch_size=3), lr=1e-3, seed=0)
    assert all(v.dtype == torch.float32 for v in update.params.values())
