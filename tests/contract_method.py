"""A test-only method that uses every hook of the method contract, so the engines are checked on it before any
real method needs them: patch tokens and feature norms as inputs, its own SGD with momentum, an unweighted
average, a private per-client tensor that is trained but never travels, a frozen private tensor, a target
predictor that differs from the clients' (the shared head plus the mean of the clients' uploaded offsets), and a
personalised model per client (the shared head plus its own offset and gain).

Registered on import; name this module in $TRIP_PLUGINS (with tests/ on PYTHONPATH) for Flower's processes."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from trip.config import OptimizerCfg
from trip.features import Inputs
from trip.methods import register
from trip.methods.base import Method, Split, Tensors, gaussian_init


class ContractCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["contract-test"]
    label: str | None = None
    optimizer: OptimizerCfg = Field(default_factory=lambda: OptimizerCfg(name="sgd", lr=0.05, momentum=0.9,
                                                                        weight_decay=1e-5))


class ContractMethod(Method):
    aggregation = "uniform"

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
        return classes * text_width  # the head

    @staticmethod
    def count_upload(cfg, text_width: int, vision_width: int, classes: int) -> int:
        return classes * text_width  # the private offset

    def inputs(self) -> Inputs:
        return Inputs(norms=True, patches=True)

    def optimizer(self) -> OptimizerCfg | None:
        return self.cfg.optimizer

    def init_params(self, seed: int) -> Tensors:
        return {"head": gaussian_init((len(self.class_names), self.backbone.text_width), seed, self.backbone.device)}

    def init_private(self, seed: int, client: int, clients: int) -> Tensors:
        shape = (len(self.class_names), self.backbone.text_width)
        return {"offset": gaussian_init(shape, seed * 1000 + client + 1, self.backbone.device),
                "gain": torch.full((1,), 1.0 + client / clients, device=self.backbone.device)}  # frozen

    def target_upload(self, private: Tensors) -> Tensors:
        return {"offset": private["offset"]}

    def target_model(self, shared: Tensors, uploads: list[Tensors]) -> Tensors:
        mean = torch.stack([u["offset"] for u in uploads]).mean(0)
        return {"head": shared["head"], "offset": mean, "gain": torch.ones(1, device=mean.device)}

    def personal_model(self, shared: Tensors, private: Tensors) -> Tensors:
        return {"head": shared["head"], "offset": private["offset"], "gain": private["gain"]}

    def _image(self, batch: Split) -> torch.Tensor:
        """[b, E] the feature moved towards the mean patch token, scaled by its norm."""
        return F.normalize(batch.features * batch["norms"][:, None] + batch["patches"].mean(1), dim=-1)

    def logits(self, params: Tensors, batch: Split) -> torch.Tensor:
        weights = params["head"] + params["gain"].detach() * params["offset"]
        return 10.0 * self._image(batch) @ weights.T

    def loss(self, params: Tensors, batch: Split) -> torch.Tensor:
        return F.cross_entropy(self.logits(params, batch), batch.labels)


register(ContractCfg, ContractMethod)
