"""benchmarks/federation_scaling.py's summary: what docs/federation.md "Scaling" reports is the mean over held-out
domains per seed, then mean ± std over seeds, with the clients' label skew read from clients.json. The sweep itself
(minutes of CPU even at its --quick size) is not run here: the run folders are written by hand in the format
`trip run` writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "federation_scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("federation_scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, seed: int, accs: dict[tuple[str, str], float], clients: dict[str, list[str]]) -> None:
    folder.mkdir(parents=True)
    runs = [{"method": m, "target": t, "seed": seed, "acc": a, "selected_round": 3, "time_s": 1.0}
            for (m, t), a in accs.items()]
    (folder / "results.json").write_text(json.dumps({"runs": runs}))
    doc = {name: {"train": paths[:-1], "val": paths[-1:]} for name, paths in clients.items()}
    (folder / "clients.json").write_text(json.dumps({str(seed): doc}))


def test_accuracy_is_averaged_over_targets_then_over_seeds_and_skew_is_read_from_the_clients(scaling, tmp_path):
    fed = scaling.SKEW_LADDER[0]
    folder = tmp_path / scaling.setting_name(fed)
    skewed = {"cartoon/0": ["cartoon/star/a.png", "cartoon/star/b.png", "cartoon/star/c.png", "cartoon/heart/d.png"],
              "cartoon/1": ["cartoon/circle/e.png", "cartoon/heart/f.png"]}
    for seed, offset in ((0, 0.0), (1, 10.0)):
        accs = {(m, t): base + offset for m, base in zip(scaling.METHODS, (40.0, 50.0, 60.0, 20.0))
                for t in ("photo", "sketch")}
        accs["trip", "sketch"] += 4.0  # seed means 62 and 72 for trip
        write_run(folder / f"seed{seed}", seed, accs, skewed)

    rows = {r["method"]: r for r in scaling.summarise(tmp_path, [fed], [0, 1])}

    assert rows["trip"]["acc_per_seed"] == [62.0, 72.0]
    assert rows["trip"]["acc"] == {"mean": 67.0, "std": pytest.approx(7.0710678)}
    assert rows["trip"]["acc_per_target"] == {"photo": 65.0, "sketch": 69.0}
    assert rows["promptfl"]["acc"]["mean"] == 55.0
    assert rows["trip"]["classes_per_client"] == 2.0  # {star, heart} and {circle, heart}
    assert rows["trip"]["largest_class_share"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert "| K5-dirichlet1 | 2.0 | 0.62 | 45.0 ± 7.1 | 55.0 ± 7.1 | 67.0 ± 7.1 | 25.0 ± 7.1 |" in \
        scaling.markdown_table(list(rows.values()))
