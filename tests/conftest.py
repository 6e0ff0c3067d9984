import os
from pathlib import Path

import pytest

# Before torch loads OpenMP (and inherited by every trip, Flower and ray process the tests start): an idle OpenMP
# thread sleeps instead of spinning, so a busy machine costs the suite wall time, not CPU taken from its own
# processes (docs/performance.md, "OpenMP threads spinning").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def pytest_configure(config):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session", autouse=True)
def trip_cache(tmp_path_factory) -> Path:
    """Every test session gets its own cache (pretrained tiny CLIP, frozen features, synthetic data), one for all
    pytest-xdist workers, unless TRIP_TEST_CACHE names one to reuse between local runs."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # a worker's basetemp is popen-gwN
    path = Path(os.environ.get("TRIP_TEST_CACHE") or shared / "trip-cache")
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TRIP_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_backbone():
    import torch

    from trip.backbone import load_backbone
    from trip.config import BackboneCfg

    return load_backbone(BackboneCfg(name="tiny", pretrained=None), torch.device("cpu"))
