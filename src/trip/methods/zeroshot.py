"""Zero-shot CLIP: no training, nothing communicated (the single template or the 60-template ensemble)."""

from __future__ import annotations

import torch

from trip.methods.base import Method, Split
from trip.methods.text import zeroshot_weights


class ZeroShot(Method):
    novel_classes = True

    def __init__(self, cfg, backbone, class_names):
        super().__init__(cfg, backbone, class_names)
        self.weights = zeroshot_weights(backbone, class_names, cfg.templates)  # [C, E]

    def logits(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        return self.backbone.logit_scale * batch.features @ batch.columns(self.weights).T
