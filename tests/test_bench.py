"""`trip bench`: the JSON it writes (tiny settings, seconds); no timing is asserted."""

from __future__ import annotations

import json

import pytest

from trip.bench import OFFICE_HOME_SIZES, table_estimate
from trip.cli import main


def test_trip_bench_tiny_writes_ratios(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench", "--device", "cpu", "--tiny", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["device_name"] and result["threads"] == 1
    measurements = result["measurements"]
    assert {m["name"] for m in measurements} == {"routing", "train_step", "eval"}
    assert {m["dataset"] for m in measurements if m["name"] != "routing"} == {"office_home", "domainnet"}
    for m in measurements:
        assert m["fast_images_per_s"] > 0 and m["naive_images_per_s"] > 0
        assert m["ratio"] == pytest.approx(m["fast_images_per_s"] / m["naive_images_per_s"])
    routing = next(m for m in measurements if m["name"] == "routing")
    assert routing["naive_agreement"] == 1.0  # the batched router reproduces the official loop
    table = result["office_home_table"]
    assert table["fast_hours"] > 0 and table["naive_hours"] > 0


def test_table_estimate_counts_the_protocol():
    one = {"fast_images_per_s": 1.0, "naive_images_per_s": 2.0}
    t = table_estimate(one, one, one, vit_images_per_s=1.0)
    total = sum(OFFICE_HOME_SIZES.values())
    assert total == 15_588
    assert t["train_images"] == pytest.approx(15 * 0.8 * 3 * total)  # each domain is a source for 3 targets
    assert t["eval_images"] == pytest.approx(15 * 2 * (0.2 * 3 * total + total))
    seconds = t["train_images"] + t["eval_images"] + 2 * total + total
    assert t["fast_hours"] == pytest.approx(seconds / 3600)


def test_an_out_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("trip.bench.run", lambda *a, **k: pytest.fail("measured first"))
    (tmp_path / "file").write_text("x")
    assert main(["bench", "--device", "cpu", "--tiny", "--out", str(tmp_path / "file" / "bench.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
