import pytest
import torch

from trip.federation.server import BMA, bma_weights, fedavg


def test_fedavg_is_size_weighted_in_fp32():
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([3.0, 6.0], dtype=torch.float16)}
    out = fedavg([a, b], [1, 3])
    assert out["x"].dtype == torch.float32
    assert torch.equal(out["x"], torch.tensor([2.5, 5.0]))


def test_bma_weights_match_the_spec():
    b = bma_weights(15, 0.2)
    expected = [1.727, 0.757, 0.532, 0.433, 0.378, 0.346, 0.328, 0.320, 0.320, 0.328, 0.346, 0.378,
                0.433, 0.532, 0.757]
    assert b == pytest.approx(expected, abs=1e-3)


def test_bma_leaves_the_init_its_share():
    init = {"e": torch.zeros(3)}
    bma = BMA(init, rounds=15)
    for r in range(15):
        bma.update({"e": torch.ones(3)}, r)
    # the BMA is init_share·0 + (1 − init_share)·1, so the init keeps 17.9 % of the mass (docs/method.md §6.2)
    assert 1 - bma.params["e"][0].item() == pytest.approx(0.179, abs=1e-3)


def test_bma_without_init_is_the_weighted_mean_of_rounds():
    bma = BMA({"e": torch.zeros(1)}, rounds=3, include_init=False)
    values = [1.0, 2.0, 4.0]
    for r, v in enumerate(values):
        bma.update({"e": torch.tensor([v])}, r)
    b = bma_weights(3)
    assert bma.params["e"].item() == pytest.approx(sum(w * v for w, v in zip(b, values)) / sum(b))
