"""Where trip keeps what it computes once (pretrained tiny CLIP, frozen features, synthetic data)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Where trip keeps what it computes once (pretrained tiny CLIP, frozen features, synthetic data)."""
    return Path(os.environ.get("TRIP_CACHE", Path.home() / ".cache" / "trip"))
