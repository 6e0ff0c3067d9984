"""Methods: each one says what travels, how a client trains it, and how it predicts. None of them knows
which engine runs it. A method of the package is listed in `_BY_CFG` (and its config in
`trip.config._METHOD_CFGS`); one defined elsewhere (a plugin, a test) calls `register`."""

from __future__ import annotations

from pydantic import BaseModel

from trip.backbone import Backbone
from trip.config import (
    FedAPTCfg,
    FedCLIPCfg,
    FedOTPCfg,
    LinearProbeCfg,
    PromptFLCfg,
    TripCfg,
    ZeroShotCfg,
    add_method_config,
    load_plugins,
)
from trip.methods.base import Method
from trip.methods.fedapt import FedAPT
from trip.methods.fedclip import FedCLIP
from trip.methods.fedotp import FedOTP
from trip.methods.linear_probe import LinearProbe
from trip.methods.promptfl import PromptFL
from trip.methods.trip import Trip
from trip.methods.zeroshot import ZeroShot

_BY_CFG: dict[type, type[Method]] = {ZeroShotCfg: ZeroShot, LinearProbeCfg: LinearProbe, PromptFLCfg: PromptFL,
                                     TripCfg: Trip, FedCLIPCfg: FedCLIP, FedOTPCfg: FedOTP, FedAPTCfg: FedAPT}


def register(cfg_cls: type[BaseModel], method_cls: type[Method]) -> None:
    """Makes a method defined outside the package runnable: its config (a pydantic model with a `name: Literal`
    and a `label`) becomes valid in `methods`. Name the module in $TRIP_PLUGINS so every process imports it."""
    add_method_config(cfg_cls)
    _BY_CFG[cfg_cls] = method_cls


def method_class(cfg) -> type[Method]:
    load_plugins()
    return _BY_CFG[type(cfg)]


def build_method(cfg, backbone: Backbone, class_names: tuple[str, ...]) -> Method:
    return method_class(cfg)(cfg, backbone, class_names)


def comm_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
    """Parameters one client sends per round (and receives), from the config and the data set's class count."""
    return method_class(cfg).count_params(cfg, text_width, vision_width, classes)


def upload_params(cfg, text_width: int, vision_width: int, classes: int) -> int:
    """Parameters one client uploads once for the target prediction, from the config and the class count."""
    return method_class(cfg).count_upload(cfg, text_width, vision_width, classes)


__all__ = ["Method", "build_method", "comm_params", "register", "upload_params"]
