"""What every method shares: the data a method sees (cached frozen tensors) and the method interface."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trip.backbone import Backbone
from trip.features import RoutingSpec


@dataclass
class Split:
    """The cached frozen view of some images: all a method needs to train or predict."""

    features: torch.Tensor  # [n, E] L2-normalised image features
    labels: torch.Tensor  # [n] int64
    cls: torch.Tensor  # [n, Dv] final-block CLS token
    routing: dict[str, torch.Tensor] = field(default_factory=dict)  # RoutingSpec.key() -> [n, M]
    norms: torch.Tensor | None = None  # [n] feature norms before normalisation (FedCLIP's adapter input)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, idx: torch.Tensor | slice) -> Split:
        return Split(self.features[idx], self.labels[idx], self.cls[idx],
                     {k: v[idx] for k, v in self.routing.items()}, None if self.norms is None else self.norms[idx])

    def to(self, device: torch.device) -> Split:
        return Split(self.features.to(device), self.labels.to(device), self.cls.to(device),
                     {k: v.to(device) for k, v in self.routing.items()},
                     None if self.norms is None else self.norms.to(device))


class Method:
    """Base class. `init_params` holds exactly what travels between clients and server."""

    uses_bma = False
    eval_batch_size = 256

    def __init__(self, cfg, backbone: Backbone, class_names: tuple[str, ...]):
        self.cfg = cfg
        self.backbone = backbone
        self.class_names = class_names
        self.label = cfg.label or cfg.name

    @staticmethod
    def count_params(cfg, text_width: int, vision_width: int) -> int:
        return 0

    @property
    def comm_params(self) -> int:
        return self.count_params(self.cfg, self.backbone.text_width, self.backbone.vision_width)

    @property
    def trainable(self) -> bool:
        return self.comm_params > 0

    def routing_specs(self) -> list[RoutingSpec]:
        return []

    def init_params(self, seed: int) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, params: dict[str, torch.Tensor], batch: Split) -> torch.Tensor:
        raise NotImplementedError


def gaussian_init(shape: tuple[int, ...], seed: int, device: torch.device) -> torch.Tensor:
    """N(0, 0.02²) from a private generator (spec §2.1), so the global RNG never matters."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.02).to(device)
