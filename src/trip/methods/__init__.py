"""Methods: each one says what travels, how a client trains it, and how it predicts. None of them knows
which engine runs it."""

from __future__ import annotations

from trip.backbone import Backbone
from trip.config import FedCLIPCfg, PromptFLCfg, TripCfg, ZeroShotCfg
from trip.methods.base import Method
from trip.methods.fedclip import FedCLIP
from trip.methods.promptfl import PromptFL
from trip.methods.trip import Trip
from trip.methods.zeroshot import ZeroShot

_BY_CFG = {ZeroShotCfg: ZeroShot, PromptFLCfg: PromptFL, TripCfg: Trip, FedCLIPCfg: FedCLIP}


def build_method(cfg, backbone: Backbone, class_names: tuple[str, ...]) -> Method:
    return _BY_CFG[type(cfg)](cfg, backbone, class_names)


def comm_params(cfg, text_width: int = 512, vision_width: int = 768) -> int:
    """Parameters one client sends per round (and receives), from the config alone."""
    return _BY_CFG[type(cfg)].count_params(cfg, text_width, vision_width)


__all__ = ["Method", "build_method", "comm_params"]
