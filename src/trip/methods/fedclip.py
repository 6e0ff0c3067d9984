"""FedCLIP (Lu et al., 2023; docs/method.md §7.2): a frozen CLIP with an attention adapter on the image feature,
A(f) = softmax(W₂·tanh(W₁f + b₁) + b₂) over the E feature dims, f' = A(f) ⊙ f. Only the adapter is trained
and FedAvg'd: 2·(E² + E) parameters (525,312 at E = 512). Text features are frozen: "a picture of a {class}".

Loss, as FedCLIP's code: CLIP's symmetric contrastive loss inside the batch, each image paired with the text
of its own label (image i ↔ text i). Two images of one class in a batch make their texts equal, and each
still counts the other's text as a negative, as FedCLIP does. Prediction: cosine against every class text."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trip.features import Inputs
from trip.methods.base import Method, Split
from trip.templates import prompt_name
from trip.textenc import encode_class_texts

TEMPLATE = "a picture of a {}"


class FedCLIP(Method):
    novel_classes = True

    def __init__(self, cfg, backbone, class_names):
        super().__init__(cfg, backbone, class_names)
        texts = [TEMPLATE.format(prompt_name(c)) for c in class_names]
        with torch.no_grad():
            self.text = F.normalize(encode_class_texts(backbone.model, backbone.tokenizer, texts).float(), dim=-1)

    def inputs(self) -> Inputs:
        return Inputs(norms=True)

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        # E is the joint embedding width, equal to the text width in every CLIP ViT (512 for ViT-B/16).
        return 2 * (text_width**2 + text_width)

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        """torch.nn.Linear's default init, U(±1/√E) for weights and biases, from a private generator."""
        e = self.text.shape[1]
        gen = torch.Generator().manual_seed(seed)

        def uniform(*shape: int) -> torch.Tensor:
            return ((torch.rand(shape, generator=gen) * 2 - 1) * e**-0.5).to(self.backbone.device)

        return {"fc1.weight": uniform(e, e), "fc1.bias": uniform(e), "fc2.weight": uniform(e, e),
                "fc2.bias": uniform(e)}

    def adapted(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        """[b, E] L2-normalised A(f) ⊙ f, with f the unnormalised image feature (FedCLIP's adapter input)."""
        f = batch.features * batch["norms"][:, None]
        hidden = torch.tanh(F.linear(f, params["fc1.weight"], params["fc1.bias"]))
        attention = torch.softmax(F.linear(hidden, params["fc2.weight"], params["fc2.bias"]), dim=-1)
        return F.normalize(attention * f, dim=-1)

    def logits(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        return self.backbone.logit_scale * self.adapted(params, batch) @ batch.columns(self.text).T

    def loss(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        texts = batch.columns(self.text)[batch.labels]  # [b, E]: each image's own class text
        per_image = self.backbone.logit_scale * self.adapted(params, batch) @ texts.T  # [b, b]
        pairs = torch.arange(len(batch), device=per_image.device)
        return (F.cross_entropy(per_image, pairs) + F.cross_entropy(per_image.T, pairs)) / 2
