"""Hand-written prompts for zero-shot classification and the frozen teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.backbone import Backbone
from trip.templates import IMAGENET_TEMPLATES, SINGLE_TEMPLATE, prompt_name
from trip.textenc import encode_class_texts


@torch.no_grad()
def zeroshot_weights(backbone: Backbone, class_names: tuple[str, ...], templates: str) -> torch.Tensor:
    """[C, E] L2-normalised class embeddings. "ensemble": the mean of the *unnormalised* features over
    the 60 ImageNet templates, then normalised (as the official teacher, docs/method.md §4); "single": one template."""
    chosen = IMAGENET_TEMPLATES if templates == "ensemble" else (SINGLE_TEMPLATE,)
    per_class = []
    for name in class_names:
        texts = [t.format(prompt_name(name)) for t in chosen]
        per_class.append(encode_class_texts(backbone.model, backbone.tokenizer, texts).float().mean(0))
    return F.normalize(torch.stack(per_class), dim=-1)
