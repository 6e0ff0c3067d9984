"""Where trip computes what the official code computes: FedAvg client weights (the images a client holds) and
the logged training loss (CE + soft cross-entropy to the teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trip.config import TrainCfg, TripCfg, parse_config
from trip.data import benchmarks as bm
from trip.experiment import prepare
from trip.federation.client import client_update
from trip.federation.inprocess import run_federation
from trip.federation.rounds import round_seed
from trip.federation.server import fedavg, fedavg_weights
from trip.methods import build_method
from trip.methods.base import Split

COUNTS = {"pacs": bm.PACS_COUNTS, "vlcs": bm.VLCS_COUNTS, "office-home": bm.OFFICE_HOME_COUNTS,
          "domainnet": bm.DOMAINNET_COUNTS}


@pytest.mark.parametrize("dataset", COUNTS)
def test_fedavg_weights_at_the_benchmarks_domain_sizes_are_the_official_ones(dataset):
    counts = COUNTS[dataset]
    for target in counts:
        sizes = [n for d, n in counts.items() if d != target]
        official = np.asarray(sizes) / np.sum(sizes)  # the official server: data_size / total, float64
        assert fedavg_weights(sizes) == official.tolist()
        train_split = fedavg_weights([int(0.8 * n) for n in sizes])
        assert fedavg_weights(sizes) != train_split or len(set(sizes)) == 1


def test_fedavg_sums_the_clients_with_their_weights():
    sizes = [bm.OFFICE_HOME_COUNTS[d] for d in ("Art", "Clipart", "Real_World")]
    one_hot = [{"x": torch.eye(3, dtype=torch.float64)[k]} for k in range(3)]
    out = fedavg(one_hot, sizes)["x"]
    assert torch.equal(out, torch.tensor(fedavg_weights(sizes), dtype=torch.float64).float())


@pytest.fixture(scope="module")
def uneven_pacs(tmp_path_factory):
    """A PACS tree whose domains hold 7, 14, 21 and 28 images: int(0.8 n) is not proportional to n."""
    root = tmp_path_factory.mktemp("data")
    for k, domain in enumerate(bm.PACS_DOMAINS):
        for c in bm.PACS_CLASSES:
            for i in range(k + 1):
                path = root / "PACS" / domain / c / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (8, 8), (40 * i, 30 * k, 160)).save(path)
    return root


def _cfg(root, **train):
    return parse_config({"device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
                         "data": {"name": "pacs", "root": str(root), "targets": ["photo"]},
                         "train": {"rounds": 1, "batch_size": 8, "lr": 0.01, **train},
                         "methods": [{"name": "promptfl", "n_ctx": 2}]})


def test_clients_weigh_the_images_they_hold_or_their_train_split(uneven_pacs):
    ws = prepare(_cfg(uneven_pacs))
    clients = ws.clients("photo", seed=42)
    assert [c.weight for c in clients] == [len(ws.domains[c.name]) for c in clients] == [7, 14, 28]
    ws.cfg = _cfg(uneven_pacs, fedavg_weight="train")
    assert [c.weight for c in ws.clients("photo", seed=42)] == [len(c.train) for c in clients] == [5, 11, 22]


def test_the_in_process_round_averages_with_the_client_weights(uneven_pacs):
    ws = prepare(_cfg(uneven_pacs))
    method, train, seed = ws.methods[0], ws.cfg.train, 42
    clients = ws.clients("photo", seed)
    result = run_federation(method, clients, ws.target("photo"), train, seed, lambda _: None)
    init = method.init_params(seed)
    updates = [client_update(method, init, c.train, train, train.lr, round_seed(seed, 0, i)).params
               for i, c in enumerate(clients)]
    want = fedavg(updates, [7, 14, 28])
    assert all(torch.equal(result.models["server"][k], want[k]) for k in want)
    assert not torch.equal(want["ctx"], fedavg(updates, [5, 11, 22])["ctx"])


# --- the logged loss ------------------------------------------------------------------------------------

CLASSES = ("circle", "square", "tennis_racket")


def _split(backbone, n=10) -> Split:
    gen = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(n, backbone.model.text_projection.shape[1], generator=gen), dim=-1)
    return Split(torch.arange(n) % len(CLASSES),
                 {"features": feats, "cls": torch.randn(n, backbone.vision_width, generator=gen)})


def test_the_logged_loss_is_ce_plus_soft_cross_entropy_to_the_teacher(tiny_backbone):
    """One step over the whole split: the logged loss is the official quantity at the initial params, computed
    here from log-sum-exps; it exceeds CE + KL by the teacher's entropy; the gradient is KL's."""
    alpha = 0.7
    method = build_method(TripCfg(name="trip", n_ctx=2, routing="uniform", teacher="single", kl_weight=alpha),
                          tiny_backbone, CLASSES)
    split = _split(tiny_backbone)
    params = method.init_params(0)
    student = method.logits(params, split)  # uniform routing: the same mixture at training and inference
    teacher = tiny_backbone.logit_scale * split.features @ method.teacher.T
    log_p = student - student.logsumexp(-1, keepdim=True)
    log_q = teacher - teacher.logsumexp(-1, keepdim=True)
    ce = -log_p[torch.arange(len(split)), split.labels].mean()
    soft = -(log_q.exp() * log_p).sum(-1).mean()
    entropy = -(log_q.exp() * log_q).sum(-1).mean()

    cfg = TrainCfg(batch_size=len(split))
    logged = client_update(method, params, split, cfg, lr=1e-3, seed=0).loss
    assert logged == pytest.approx((ce + alpha * soft).item(), rel=1e-6)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    assert logged == pytest.approx((ce + alpha * (kl + entropy)).item(), rel=1e-5)
    assert entropy.item() > 0.1  # the two logged values differ visibly

    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    (grad,) = torch.autograd.grad(method.loss(p, split), list(p.values()))
    s = method.logits(p, split)
    kl_loss = F.cross_entropy(s, split.labels) + alpha * F.kl_div(F.log_softmax(s, -1), log_q, log_target=True,
                                                                  reduction="batchmean")
    (kl_grad,) = torch.autograd.grad(kl_loss, list(p.values()))
    assert torch.allclose(grad, kl_grad, rtol=1e-4, atol=1e-7)
