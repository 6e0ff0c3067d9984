"""`federation.dp` on Flower: Flower's fixed-clipping wrappers around the train step of TripStrategy, and
Flower's clipping mod on the ClientApp's train messages (docs/federation.md).

Server mode: the server clips each reply's update (reply - global tensors) to `clipping_norm`, aggregates and
adds Gaussian noise of std noise_multiplier * clipping_norm / clients sampled. Client mode: the server sends the
norm in the train config, the ClientApp clips its update before replying, the server aggregates and adds the
same noise. Clipping at an infinite norm leaves an update as it is, but Flower computes it as
global + (reply - global), which can differ from the reply in the last bit of a float32; at an infinite norm
trip therefore skips that identity, and at noise 0 it adds no noise, so that noise 0 with an infinite norm gives
the plain run's numbers exactly."""

from __future__ import annotations

import math
from collections.abc import Iterable

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from trip.config import DPCfg


class _NoNoiseAtZero:
    """Noise multiplier 0 adds nothing: Flower would add noise of std 0 * clipping_norm / n, which is NaN at an
    infinite norm."""

    def _add_noise_to_aggregated_arrays(self, arrays: ArrayRecord) -> ArrayRecord:
        return arrays if self.noise_multiplier == 0 else super()._add_noise_to_aggregated_arrays(arrays)


class ClientSideClipping(_NoNoiseAtZero, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side wrapper (the ClientApps clip: `clipping_mod`)."""


class ServerSideClipping(_NoNoiseAtZero, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side wrapper; at an infinite clipping norm the replies reach the strategy unchanged."""

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if math.isfinite(self.clipping_norm):
            return super().aggregate_train(server_round, replies)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        return self._add_noise_to_aggregated_arrays(arrays), metrics


def dp_train_step(strategy: Strategy, dp: DPCfg, sampled: int) -> Strategy:
    """`strategy` wrapped by Flower's DP wrapper of `dp.mode`; `sampled`: the clients sampled per round."""
    wrapper = ServerSideClipping if dp.mode == "server" else ClientSideClipping
    return wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, sampled)


def clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` on a train message that carries a finite clipping norm (client-side DP);
    any other message goes to the ClientApp as it came."""
    config = msg.content.config_records.get("config")
    norm = config.get(KEY_CLIPPING_NORM) if config is not None else None
    if norm is None or math.isinf(float(norm)):
        return call_next(msg, context)
    return fixedclipping_mod(msg, context, call_next)
