"""Differential privacy of a federation (`federation.dp`, docs/federation.md): which runs it can cover, and the
privacy a run has spent, as (epsilon, delta) from dp-accounting's RDP accountant."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING

from trip.config import DPCfg, ExperimentCfg
from trip.errors import TripError

if TYPE_CHECKING:  # the CLI checks the engine before torch is imported
    from trip.methods.base import Method

Release = tuple[float, float]  # one noised aggregate: (sample rate, noise multiplier)


def check_engine(cfg: ExperimentCfg, engine: str) -> None:
    if cfg.federation.dp is not None and engine == "inprocess":
        raise TripError("federation.dp runs on Flower's differential-privacy wrappers, which the in-process engine "
                        "does not use: run with --engine flower or flower-sim, or remove federation.dp")


def check_method(method: Method, cfg: ExperimentCfg) -> None:
    """A method that uploads per-client tensors for the target sends them outside the clipped and noised
    aggregate: DP would not cover them."""
    if cfg.federation.dp is not None and method.upload_params:
        raise TripError(f"{method.label} uploads {method.upload_params:,} parameters of each client's private "
                        f"tensors for the held-out domain, outside the clipped and noised aggregate, so "
                        f"federation.dp would not cover them: choose a target mode that uploads nothing, or remove "
                        f"federation.dp")


def effective_noise_multiplier(noise_multiplier: float, weights: list[int], sampled: int) -> float:
    """Flower adds noise of std z·C/n (n clients sampled) to the aggregate Σ w_i·u_i / Σ w_i of updates u_i
    clipped to norm C. Client i moves that aggregate by at most C·w_i / Σ w, so the noise is
    z·Σw / (n·max w) times the largest move: z when n clients of equal weight reply, less with unequal weights
    or fewer replies."""
    return noise_multiplier * sum(weights) / (sampled * max(weights))


def epsilon(releases: list[Release], delta: float) -> float:
    """Epsilon at `delta` after the releases, each a Poisson-subsampled Gaussian mechanism; inf if one had no
    noise, 0 for none."""
    if any(z == 0 for _, z in releases):
        return math.inf
    if not releases:
        return 0.0
    try:  # the `dp` extra: imported only where a run has federation.dp
        import dp_accounting
        from dp_accounting.rdp import RdpAccountant
    except ImportError:
        raise TripError("federation.dp needs the dp-accounting package: pip install 'trip-fl[dp]'") from None

    accountant = RdpAccountant()
    for (q, z), count in Counter(releases).items():  # one RDP computation per kind of release, not per round
        accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), count)
    return float(accountant.get_epsilon(delta))


def round_privacy(dp: DPCfg, history: list[dict], sample_rate: float, weights: list[int], sampled: int) -> dict:
    """The "dp" entry of a round record: this round's release (none when no update was aggregated) and the
    epsilon of every release so far (`history`: the earlier round records)."""
    z = effective_noise_multiplier(dp.noise_multiplier, weights, sampled) if weights else None
    releases = [(h["dp"]["sample_rate"], h["dp"]["effective_noise_multiplier"]) for h in history
                if h.get("dp", {}).get("effective_noise_multiplier") is not None]
    releases += [(sample_rate, z)] if z is not None else []
    return {"epsilon": epsilon(releases, dp.delta), "delta": dp.delta, "noise_multiplier": dp.noise_multiplier,
            "clipping_norm": dp.clipping_norm, "sample_rate": sample_rate, "effective_noise_multiplier": z}
