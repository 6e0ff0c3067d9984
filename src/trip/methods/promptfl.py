"""PromptFL: one CoOp context shared by all classes and images, FedAvg'd (16 tokens = 8,192 parameters
at text width 512). Cross-entropy only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.backbone import autocast
from trip.methods.base import Method, Split, gaussian_init
from trip.textenc import build_prompt_tokens, encode_prompts


class PromptFL(Method):
    novel_classes = True

    def __init__(self, cfg, backbone, class_names):
        super().__init__(cfg, backbone, class_names)
        self.tokens = build_prompt_tokens(backbone.model, backbone.tokenizer, class_names, cfg.n_ctx)

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        return cfg.n_ctx * text_width

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        return {"ctx": gaussian_init((self.cfg.n_ctx, self.backbone.text_width), seed, self.backbone.device)}

    def logits(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        with autocast(self.backbone.device):  # bf16 text encoder on GPU; fp32 (a no-op) on CPU
            text = encode_prompts(self.backbone.model, batch.columns(self.tokens), params["ctx"][None])[0]  # [C, E]
        return self.backbone.logit_scale * batch.features @ F.normalize(text.float(), dim=-1).T

    def loss(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, batch), batch.labels)
