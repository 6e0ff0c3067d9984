"""FedAPT (Su et al., AAAI 2024), as its official code trains it (docs/reproduce.md "FedAPT"): a class-specific
meta prompt `ctx` [C, N_CTX, W] (CoOp layout, class token at the end) and a bias-free linear domain classifier
Q [K, E] travel and are averaged (equal weights by default); frozen U[0,1) keys [K, N_CTX, W], one per source
client, come from a shared seed and never travel.

Client k trains the prompt ctx ⊙ (1 + key_k) with CE(class logits, y) + CE(Q(f), k), f the unnormalised image
embedding. The deployed model prompts each image with ctx ⊙ (1 + Σ_k w_k key_k), w = softmax(z-score(Q(f)) / t)
(unbiased std over the K scores), one text pass per image."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.backbone import autocast
from trip.errors import TripError
from trip.features import Inputs
from trip.methods.base import Method, Split, Tensors, gaussian_init
from trip.textenc import build_prompt_tokens, encode_class_specific


class FedAPT(Method):
    eval_batch_size = 64  # every image encodes C prompts

    def __init__(self, cfg, backbone, class_names):
        super().__init__(cfg, backbone, class_names)
        self.aggregation = cfg.aggregation
        self.tokens = build_prompt_tokens(backbone.model, backbone.tokenizer, class_names, cfg.n_ctx)
        gen = torch.Generator().manual_seed(cfg.key_seed)
        self.keys = torch.rand((cfg.sources, cfg.n_ctx, backbone.text_width), generator=gen).to(backbone.device)

    def inputs(self) -> Inputs:
        return Inputs(norms=True)

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        # Q's input is the joint embedding, as wide as the text tower in every CLIP ViT (512 for ViT-B/16).
        return classes * cfg.n_ctx * text_width + text_width * cfg.sources

    def init_params(self, seed: int) -> Tensors:
        """The prompt N(0, 0.02²); Q as torch.nn.Linear's default init, U(±1/√E); from private generators."""
        e = self.backbone.text_width
        q = (torch.rand((self.cfg.sources, e), generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1) * e**-0.5
        ctx = gaussian_init((len(self.class_names), self.cfg.n_ctx, e), seed, self.backbone.device)
        return {"ctx": ctx, "q": q.to(self.backbone.device)}

    def check_clients(self, clients: int) -> None:
        if clients != self.cfg.sources:
            raise TripError(f"{self.label}: sources is {self.cfg.sources} but this run has {clients} source clients; "
                            f"set `sources: {clients}` in the method's config (the run's clients: the data set's "
                            f"domains minus one, or all of them under protocol multidomain, times "
                            f"federation.clients_per_domain)")

    def init_private(self, seed: int, client: int, clients: int) -> Tensors:
        """The client's domain index (its key is `self.keys[index]`); the loss never differentiates it."""
        self.check_clients(clients)
        return {"domain": torch.tensor([float(client)], device=self.backbone.device)}

    def loss(self, params: Tensors, batch: Split) -> torch.Tensor:
        k = params["domain"].detach().long()  # [1]
        ctx = params["ctx"] * (1 + self.keys[k])  # [C, n, W]: one prompt for every image of the client
        f = self._embedding(batch)
        logits = self._class_logits(f, self._text(ctx[None]).expand(len(batch), -1, -1))
        return F.cross_entropy(logits, batch.labels) + F.cross_entropy(f @ params["q"].T, k.expand(len(batch)))

    def logits(self, params: Tensors, batch: Split) -> torch.Tensor:
        f = self._embedding(batch)
        w = torch.softmax(zscore(f @ params["q"].T) / self.cfg.temperature, dim=-1)  # [b, K]
        mix = torch.einsum("bk,knw->bnw", w, self.keys)
        ctx = params["ctx"][None] * (1 + mix[:, None])  # [b, C, n, W]
        return self._class_logits(f, self._text(ctx))

    def _embedding(self, batch: Split) -> torch.Tensor:
        """[b, E] the image embedding before normalisation (Q's input in the official code)."""
        return batch.features * batch["norms"][:, None]

    def _text(self, ctx: torch.Tensor) -> torch.Tensor:
        with autocast(self.backbone.device):  # bf16 text encoder on GPU; fp32 (a no-op) on CPU
            return encode_class_specific(self.backbone.model, self.tokens, ctx).float()  # [b, C, E]

    def _class_logits(self, f: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        cos = torch.einsum("be,bce->bc", F.normalize(f, dim=-1), F.normalize(text, dim=-1))
        return self.backbone.logit_scale * cos


def zscore(s: torch.Tensor) -> torch.Tensor:
    """Standardised across the last dim with the unbiased std, as the official server model."""
    return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True)
