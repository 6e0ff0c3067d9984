import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def trip_cache(tmp_path_factory) -> Path:
    """Every test session gets its own cache (pretrained tiny CLIP, frozen features, synthetic data),
    unless TRIP_TEST_CACHE names one to reuse between local runs."""
    path = Path(os.environ.get("TRIP_TEST_CACHE") or tmp_path_factory.mktemp("trip-cache"))
    os.environ["TRIP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone():
    from trip.backbone import load_backbone
    from trip.config import BackboneCfg

    return load_backbone(BackboneCfg(name="tiny", pretrained=None), torch.device("cpu"))
