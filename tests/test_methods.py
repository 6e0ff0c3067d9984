import copy

import pytest
import torch
import torch.nn.functional as F

from trip.config import LinearProbeCfg, PromptFLCfg, TrainCfg, TripCfg, ZeroShotCfg, parse_config
from trip.features import RoutingSpec
from trip.federation.client import accuracy, client_update
from trip.methods import build_method, comm_params
from trip.methods.base import Split

CLASSES = ("circle", "square", "tennis_racket")


def _split(backbone, n=12, routing_specs=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(n, backbone.model.text_projection.shape[1], generator=gen), dim=-1)
    routing = {}
    for spec in routing_specs:
        w = torch.rand(n, spec.num_experts, generator=gen)
        routing[spec.key()] = w / w.sum(-1, keepdim=True)
    return Split(torch.arange(n) % len(CLASSES),
                 {"features": feats, "cls": torch.randn(n, backbone.vision_width, generator=gen), **routing})


def test_comm_accounting_for_the_paper_backbone():
    methods = parse_config({"methods": [{"name": "trip"}, {"name": "trip-lite"}, {"name": "promptfl"},
                                        {"name": "zeroshot"},
                                        {"name": "trip", "routing": "learned", "label": "learned"},
                                        {"name": "linear-probe"}]}).methods
    counts = [comm_params(m, text_width=512, vision_width=768, classes=65) for m in methods]
    assert counts == [65_536, 1_024, 8_192, 0, 65_536 + 4 * (768 + 1), 65 * 512 + 65]


@pytest.mark.parametrize("routing", ["token", "learned", "image-soft"])
def test_only_the_communicated_tensors_learn(tiny_backbone, routing):
    method = build_method(TripCfg(name="trip", n_ctx=4, routing=routing), tiny_backbone, CLASSES)
    split = _split(tiny_backbone, routing_specs=method.inputs().routing)
    before = copy.deepcopy(tiny_backbone.model.state_dict())
    init = method.init_params(seed=1)
    update = client_update(method, init, split, TrainCfg(batch_size=4, lr=1e-2), lr=1e-2, seed=0)
    assert set(update.params) == set(init)
    assert all(not torch.equal(update.params[k], init[k]) for k in init)  # they all moved
    for name, tensor in tiny_backbone.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name  # frozen encoders bit-identical
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_expert_init_independent_or_tied(tiny_backbone):
    free = build_method(TripCfg(name="trip", n_ctx=2), tiny_backbone, CLASSES).init_params(0)["experts"]
    tied = build_method(TripCfg(name="trip", n_ctx=2, tie_expert_init=True), tiny_backbone,
                        CLASSES).init_params(0)["experts"]
    assert not torch.equal(free[0], free[1])
    assert all(torch.equal(tied[0], tied[e]) for e in range(4))
    assert free.std().item() == pytest.approx(0.02, rel=0.15)


def test_mixture_of_identical_experts_is_that_expert(tiny_backbone):
    """With every expert equal, any mixture weights give the same prompt, so TRIP's logits equal
    PromptFL's with that context."""
    trip = build_method(TripCfg(name="trip", n_ctx=3, tie_expert_init=True), tiny_backbone, CLASSES)
    promptfl = build_method(PromptFLCfg(name="promptfl", n_ctx=3), tiny_backbone, CLASSES)
    params = trip.init_params(5)
    split = _split(tiny_backbone, n=5, routing_specs=trip.inputs().routing)
    got = trip.logits(params, split)
    want = promptfl.logits({"ctx": params["experts"][0]}, split)
    assert torch.allclose(got, want, atol=1e-4)


def test_mixture_weights_come_from_the_right_router(tiny_backbone):
    trip = build_method(TripCfg(name="trip", n_ctx=1), tiny_backbone, CLASSES)
    split = _split(tiny_backbone, routing_specs=trip.inputs().routing)
    assert trip.route_train == RoutingSpec(4, 1.0, 100, 0, "hungarian")
    assert torch.equal(trip.mixture_weights({}, split, train=True), split[trip.route_train.key()])
    assert torch.equal(trip.mixture_weights({}, split, train=False), split[trip.route_infer.key()])
    uniform = build_method(TripCfg(name="trip", routing="uniform"), tiny_backbone, CLASSES)
    assert torch.allclose(uniform.mixture_weights({}, split, True), torch.full((12, 4), 0.25))


def test_kl_term_pulls_toward_the_teacher(tiny_backbone):
    cfg = TripCfg(name="trip", n_ctx=2, kl_weight=0.0)
    plain = build_method(cfg, tiny_backbone, CLASSES)
    with_kl = build_method(cfg.model_copy(update={"kl_weight": 1.0}), tiny_backbone, CLASSES)
    params = plain.init_params(0)
    split = _split(tiny_backbone, routing_specs=plain.inputs().routing)
    student = plain.logits(params, split)  # eval routing; the loss uses train routing
    assert with_kl.loss(params, split).item() > plain.loss(params, split).item()
    assert student.shape == (12, 3)


def test_zeroshot_accuracy_is_in_percent(tiny_backbone):
    method = build_method(ZeroShotCfg(name="zeroshot", templates="single"), tiny_backbone, CLASSES)
    split = _split(tiny_backbone)
    assert not method.trainable and method.init_params(0) == {}
    acc = accuracy(method, {}, split)
    assert 0.0 <= acc <= 100.0
    logits = method.logits({}, split)
    assert acc == pytest.approx(100 * (logits.argmax(-1) == split.labels).float().mean().item())


def test_linear_probe_logits_are_a_linear_map_of_the_feature(tiny_backbone):
    method = build_method(LinearProbeCfg(name="linear-probe"), tiny_backbone, CLASSES)
    init = method.init_params(seed=3)
    assert {k: v.shape for k, v in init.items()} == {"weight": (3, 64), "bias": (3,)}
    assert all(not v.any() for v in init.values())  # zeros: the seed plays no part
    assert method.comm_params == 3 * 64 + 3 and not method.novel_classes
    gen = torch.Generator().manual_seed(1)
    params = {"weight": torch.randn(3, 64, generator=gen), "bias": torch.randn(3, generator=gen)}
    split = _split(tiny_backbone, n=5)
    f, s = split.features, tiny_backbone.logit_scale
    want = [[s * sum(params["weight"][c, j].item() * f[i, j].item() for j in range(64)) + params["bias"][c].item()
             for c in range(3)] for i in range(5)]
    assert torch.allclose(method.logits(params, split), torch.tensor(want), atol=1e-4)


def test_linear_probe_learns_separable_features(tiny_backbone):
    """Each class a direction of the feature space plus noise: the probe trained from zero separates them, where
    the untrained probe (every logit equal) scores chance."""
    method = build_method(LinearProbeCfg(name="linear-probe"), tiny_backbone, CLASSES)
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(len(CLASSES), 64, generator=gen), dim=-1)
    labels = torch.arange(300) % len(CLASSES)

    def split() -> Split:
        noisy = centres[labels] + 0.12 * torch.randn(len(labels), 64, generator=gen)
        return Split(labels, {"features": F.normalize(noisy, dim=-1)})

    train, test = split(), split()
    init = method.init_params(seed=0)
    assert accuracy(method, init, test) == pytest.approx(100 / len(CLASSES))
    update = client_update(method, init, train, TrainCfg(batch_size=16), lr=5e-4, seed=0)
    assert accuracy(method, update.params, test) >= 95
