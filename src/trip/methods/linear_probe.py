"""The federated linear probe (docs/method.md §7.3): logits = s·(W·f) + b on the frozen L2-normalised image
feature f, W [C, E] and b [C] trained with cross-entropy and FedAvg'd (C·E + C parameters per round, 3,591 on PACS
at E = 512). No text at all: the reference row for how far a classifier on the frozen features gets from the
source domains. It learns one row per class, so it cannot score a class no client trained on (no base2novel).

Init at zero: the probe is convex, so nothing needs breaking symmetrically, and every seed starts from the same
model (seeds differ only through the clients' batch orders). s is the backbone's fixed CLIP logit scale, as for
every other method's cosine logits: with AdamW's per-coordinate steps a unit-scale probe moves its logits by about
lr·√E per step and underfits at trip's lr 5e-4 (docs/method.md §7.3 has the measurement)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.methods.base import Method, Split


class LinearProbe(Method):
    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        # E is the joint embedding width, equal to the text width in every CLIP ViT (512 for ViT-B/16).
        return classes * text_width + classes

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        width = self.backbone.model.text_projection.shape[1]
        device = self.backbone.device
        return {"weight": torch.zeros(len(self.class_names), width, device=device),
                "bias": torch.zeros(len(self.class_names), device=device)}

    def logits(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        return self.backbone.logit_scale * F.linear(batch.features, params["weight"]) + params["bias"]

    def loss(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, batch), batch.labels)
