import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trip.config import FedCLIPCfg, OptimizerCfg, TrainCfg, parse_config
from trip.experiment import run_experiment
from trip.federation.client import client_update
from trip.federation.optim import make_optimizer
from trip.methods import build_method, comm_params
from trip.methods.base import Split

CLASSES = ("circle", "square", "tennis_racket")


def _split(backbone, n=10, seed=0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, backbone.model.text_projection.shape[1], generator=gen) * 10
    return Split(torch.arange(n) % len(CLASSES), {"features": F.normalize(raw, dim=-1), "norms": raw.norm(dim=-1)})


def test_comm_params_at_the_paper_width():
    assert comm_params(FedCLIPCfg(name="fedclip"), text_width=512, vision_width=768, classes=65) == 525_312


def test_optimizer_defaults_and_partial_override():
    default = parse_config({"methods": [{"name": "fedclip"}]}).methods[0].optimizer
    assert default == OptimizerCfg(name="adam", lr=5e-5, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
    partial = parse_config({"methods": [{"name": "fedclip", "optimizer": {"lr": 1e-4}}]}).methods[0].optimizer
    assert (partial.name, partial.lr, partial.eps, partial.weight_decay) == ("adam", 1e-4, 1e-6, 0.2)
    assert parse_config({"methods": [{"name": "fedclip", "optimizer": None}]}).methods[0].optimizer is None


def test_own_optimizer_keeps_the_round_schedule():
    train = TrainCfg(lr=5e-4, lr_decay=0.8)
    p = [torch.zeros(2, requires_grad=True)]
    own = make_optimizer(p, train, FedCLIPCfg(name="fedclip").optimizer, lr=5e-4 * 0.8**2)
    assert type(own) is torch.optim.Adam
    group = own.param_groups[0]
    assert group["lr"] == pytest.approx(5e-5 * 0.8**2)
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.98), 1e-6, 0.2)
    plain = make_optimizer(p, train, None, lr=1.234e-4).param_groups[0]
    assert (plain["lr"], plain["betas"], plain["eps"], plain["weight_decay"]) == (1.234e-4, (0.9, 0.98), 1e-7, 0.01)


def test_gradients_reach_only_the_adapter(tiny_backbone):
    method = build_method(FedCLIPCfg(name="fedclip"), tiny_backbone, CLASSES)
    text = method.text.clone()
    before = copy.deepcopy(tiny_backbone.model.state_dict())
    init = method.init_params(seed=1)
    e = tiny_backbone.model.text_projection.shape[1]
    assert {k: tuple(v.shape) for k, v in init.items()} == {
        "fc1.weight": (e, e), "fc1.bias": (e,), "fc2.weight": (e, e), "fc2.bias": (e,)}
    cfg = parse_config({"train": {"batch_size": 4}, "methods": [{"name": "fedclip", "optimizer": {"lr": 1e-2}}]})
    update = client_update(method, init, _split(tiny_backbone), cfg.train, lr=cfg.train.lr, seed=0)
    assert all(not torch.equal(update.params[k], init[k]) for k in init)
    for name, tensor in tiny_backbone.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert torch.equal(method.text, text)


def test_loss_and_logits_match_fedclip_code(tiny_backbone):
    """The reference is FedCLIP's own formulation: an nn.Sequential adapter on the unnormalised feature, labels
    arange(b) for both directions, prediction by cosine against every class text."""
    method = build_method(FedCLIPCfg(name="fedclip"), tiny_backbone, CLASSES)
    params = method.init_params(seed=3)
    split = _split(tiny_backbone, n=6)
    e = method.text.shape[1]
    adapter = nn.Sequential(nn.Linear(e, e), nn.Tanh(), nn.Linear(e, e), nn.Softmax(dim=1))
    adapter.load_state_dict({"0.weight": params["fc1.weight"], "0.bias": params["fc1.bias"],
                             "2.weight": params["fc2.weight"], "2.bias": params["fc2.bias"]})
    raw = split.features * split["norms"][:, None]
    image = F.normalize(adapter(raw) * raw, dim=1)
    per_image = tiny_backbone.logit_scale * image @ method.text[split.labels].t()
    truth = torch.arange(len(split))
    want = (F.cross_entropy(per_image, truth) + F.cross_entropy(per_image.t(), truth)) / 2
    assert torch.allclose(method.loss(params, split), want, atol=1e-5)
    assert torch.allclose(method.logits(params, split), tiny_backbone.logit_scale * image @ method.text.t(), atol=1e-4)


def test_two_round_tiny_run(tmp_path):
    cfg = parse_config({
        "name": "fedclip smoke", "backbone": {"name": "tiny", "pretrained": None}, "device": "cpu",
        "data": {"name": "synthetic", "images_per_class": 4, "targets": ["photo"]},
        "train": {"rounds": 2, "batch_size": 8},
        "methods": [{"name": "fedclip", "optimizer": {"lr": 1e-3}}],
    })
    runs = run_experiment(cfg, tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run["rounds"] == 2 and run["comm_params_per_round"] == 2 * (64**2 + 64)
    assert 0 <= run["acc"] <= 100 and 0 <= run["val_mean"] <= 100
    assert "fedclip" in (tmp_path / "summary.md").read_text()
