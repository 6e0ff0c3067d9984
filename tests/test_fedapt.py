"""FedAPT against a direct transcription of its official formulas (CoOp's text encoder per prompt, the z-scored
domain scores, the temperature, the key mixture), its parameter count, its optimizer and its private state."""

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from trip.cli import main
from trip.config import FedAPTCfg, OptimizerCfg, TrainCfg, parse_config
from trip.data.datasets import get_dataset
from trip.errors import TripError
from trip.federation.client import client_update
from trip.methods import build_method, comm_params
from trip.methods.base import Split
from trip.textenc import build_prompt_tokens, encode_class_specific

CLASSES = ("circle", "square", "tennis_racket")
REPO = Path(__file__).resolve().parents[1]


def _method(backbone, **cfg):
    return build_method(FedAPTCfg(name="fedapt", n_ctx=4, **cfg), backbone, CLASSES)


def _split(backbone, n=6, seed=0) -> Split:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, backbone.text_width, generator=gen) * 10
    return Split(torch.arange(n) % len(CLASSES), {"features": F.normalize(raw, dim=-1), "norms": raw.norm(dim=-1)})


def _trained(method, seed=3):
    """Shared tensors away from their init, so every term of the formulas matters."""
    params = method.init_params(seed)
    gen = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=gen) * v.std() for k, v in params.items()}


def official_text(model, tokenizer, ctx: torch.Tensor) -> torch.Tensor:
    """CoOp's TextEncoder on the class-specific prompts "X … X <class>." with ctx [C, n, W] -> [C, E]."""
    n = ctx.shape[1]
    ids = tokenizer([" ".join(["X"] * n) + f" {c.replace('_', ' ')}." for c in CLASSES])
    emb = model.token_embedding(ids)
    x = torch.cat([emb[:, :1], ctx, emb[:, 1 + n:]], dim=1) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(len(CLASSES)), ids.argmax(-1)] @ model.text_projection


def official_server_logits(backbone, method, params, batch, t: float) -> torch.Tensor:
    """The official server model, one image at a time."""
    rows = []
    for i in range(len(batch)):
        f = batch.features[i] * batch["norms"][i]
        s = params["q"] @ f
        std = ((s - s.mean()) ** 2).sum().div(len(s) - 1).sqrt()
        z = (s - s.mean()) / std / t
        w = torch.exp(z - z.max())  # softmax, written out
        w = w / w.sum()
        key = sum(w[k] * method.keys[k] for k in range(len(w)))
        text = official_text(backbone.model, backbone.tokenizer, params["ctx"] * (1 + key))
        rows.append(backbone.logit_scale * F.normalize(text, dim=-1) @ (f / f.norm()))
    return torch.stack(rows)


@torch.no_grad()
def test_class_specific_encoder_equals_coop_per_prompt(tiny_backbone):
    tokens = build_prompt_tokens(tiny_backbone.model, tiny_backbone.tokenizer, CLASSES, 4)
    ctx = torch.randn(2, len(CLASSES), 4, tiny_backbone.text_width, generator=torch.Generator().manual_seed(0))
    ours = encode_class_specific(tiny_backbone.model, tokens, ctx, row_chunk=2)
    for i in range(2):
        torch.testing.assert_close(ours[i], official_text(tiny_backbone.model, tiny_backbone.tokenizer, ctx[i]),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t", [0.01, 1.0])  # 0.01: official, nearly one-hot; 1.0: every weight (and the std) counts
@torch.no_grad()
def test_inference_logits_equal_the_official_per_image_computation(tiny_backbone, t):
    method = _method(tiny_backbone, temperature=t)
    params, batch = _trained(method), _split(tiny_backbone)
    ours = method.logits(method.target_model(params, [{}] * 3), batch)
    torch.testing.assert_close(ours, official_server_logits(tiny_backbone, method, params, batch, t), rtol=1e-5,
                               atol=1e-4)
    # the mixture is per image: images choose different keys, and another key choice changes the logits
    w = torch.softmax(((s := batch.features * batch["norms"][:, None] @ params["q"].T) - s.mean(1, keepdim=True))
                      / s.std(1, keepdim=True) / t, dim=1)
    assert len(set(w.argmax(1).tolist())) > 1
    assert not torch.allclose(ours, method.logits({**params, "q": params["q"].flip(0)}, batch))


@torch.no_grad()
def test_training_loss_is_class_ce_plus_domain_ce_with_the_clients_key(tiny_backbone):
    method = _method(tiny_backbone)
    params, batch = _trained(method), _split(tiny_backbone)
    for k in range(3):
        private = method.init_private(0, k, 3)
        f = batch.features * batch["norms"][:, None]
        text = official_text(tiny_backbone.model, tiny_backbone.tokenizer, params["ctx"] * (1 + method.keys[k]))
        logits = tiny_backbone.logit_scale * F.normalize(f, dim=-1) @ F.normalize(text, dim=-1).T
        domain = torch.full((len(batch),), k)
        want = F.cross_entropy(logits, batch.labels) + F.cross_entropy(f @ params["q"].T, domain)
        torch.testing.assert_close(method.loss(params | private, batch), want, rtol=1e-5, atol=1e-5)


def test_keys_are_frozen_uniform_and_shared_by_seed(tiny_backbone):
    method, again = _method(tiny_backbone), _method(tiny_backbone)
    assert method.keys.shape == (3, 4, tiny_backbone.text_width)
    assert torch.equal(method.keys, again.keys) and 0 <= method.keys.min() and method.keys.max() < 1
    assert not torch.equal(method.keys, _method(tiny_backbone, key_seed=2).keys)
    keys, init, private = method.keys.clone(), method.init_params(0), method.init_private(0, 1, 3)
    update = client_update(method, init, _split(tiny_backbone), TrainCfg(batch_size=4), lr=5e-4, seed=0,
                           private=private)
    assert all(not torch.equal(update.params[k], init[k]) for k in init)  # prompt and Q both train
    assert torch.equal(update.private["domain"], private["domain"]) and torch.equal(method.keys, keys)


def test_param_count_matches_the_tensors_and_the_paper(tiny_backbone):
    method = _method(tiny_backbone)
    assert method.comm_params == sum(v.numel() for v in method.init_params(0).values())
    assert comm_params(FedAPTCfg(name="fedapt"), 512, 768, 65) == 534_016  # the paper's 0.534M
    assert comm_params(FedAPTCfg(name="fedapt"), 512, 768, 7) == 58_880
    assert comm_params(FedAPTCfg(name="fedapt", sources=5), 512, 768, 345) == 2_828_800


def _fake_tree(base: Path, name: str) -> Path:
    buf = io.BytesIO()
    Image.new("RGB", (2, 2), (200, 30, 30)).save(buf, format="PNG")
    spec = get_dataset(name)
    for domain in spec.domains:
        for cls in spec.classes:
            (base / spec.folder_names[0] / domain / cls).mkdir(parents=True)
            (base / spec.folder_names[0] / domain / cls / "0.png").write_bytes(buf.getvalue())
    return base


@pytest.mark.parametrize(("folder", "dataset", "count"), [("officehome", "office-home", "534,016"),
                                                          ("pacs", "pacs", "58,880")])
def test_dry_run_prints_the_papers_count(folder, dataset, count, tmp_path, capsys):
    root = _fake_tree(tmp_path, dataset)
    assert main(["run", str(REPO / "configs" / folder / "fedapt.yaml"), "--dry-run", "--data-root", str(root)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("fedapt"))
    assert row.split()[1] == count


def test_optimizer_aggregation_and_a_wrong_client_count(tiny_backbone):
    cfg = parse_config({"methods": [{"name": "fedapt"}, {"name": "fedapt", "label": "b", "optimizer": {"lr": 0.1},
                                                         "aggregation": "weighted"}]})
    assert cfg.methods[0].optimizer == OptimizerCfg(name="sgd", lr=0.01, momentum=0.9, weight_decay=1e-5)
    assert cfg.methods[1].optimizer == OptimizerCfg(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-5)
    assert _method(tiny_backbone).aggregation == "uniform"
    assert _method(tiny_backbone, aggregation="weighted").aggregation == "weighted"
    with pytest.raises(TripError, match="sources: 5"):
        _method(tiny_backbone).init_private(0, 0, 5)
