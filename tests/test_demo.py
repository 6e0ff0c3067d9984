"""`trip demo` end to end, as the README runs it (issue #2 acceptance), with the pretrained tiny CLIP."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trip.data import synthetic


def _trip(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trip.cli", *args], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _runs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["runs"]


def _avg(runs: list[dict], method: str) -> float:
    accs = [r["acc"] for r in runs if r["method"] == method]
    return sum(accs) / len(accs)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, _trip("demo", "--out", str(out)).stdout


@pytest.mark.slow
def test_demo_runs_every_method_on_every_held_out_domain(demo):
    out, stdout = demo
    runs = _runs(out)
    methods = ["zeroshot", "linear-probe", "promptfl", "trip", "trip-lite", "fedotp", "fedapt"]
    assert {(r["method"], r["target"]) for r in runs} == {(m, d) for m in methods for d in synthetic.DOMAINS}
    assert all(0.0 <= r["acc"] <= 100.0 for r in runs)
    for name in ("config.yaml", "rounds.jsonl", "summary.md"):
        assert (out / name).is_file()
    assert "tiny CLIP" in stdout and "synthetic" in stdout
    for m in methods:
        assert m in stdout


@pytest.mark.slow
def test_demo_communication_accounting(demo):
    runs = _runs(demo[0])
    comm = {r["method"]: r["comm_params_per_round"] for r in runs}
    width = 64  # the tiny CLIP's text width
    assert comm == {"zeroshot": 0, "linear-probe": 6 * width + 6, "promptfl": 16 * width, "trip": 4 * 8 * width,
                    "trip-lite": 2 * 1 * width, "fedotp": 16 * width, "fedapt": 6 * 16 * width + 3 * width}
    assert all(r["comm_bytes_per_round"] == 4 * r["comm_params_per_round"] for r in runs)


@pytest.mark.slow
def test_demo_accuracies_make_sense(demo):
    runs = _runs(demo[0])
    chance = 100 / len(synthetic.CLASSES)
    zeroshot = _avg(runs, "zeroshot")
    assert zeroshot > chance + 10, "the pretrained tiny CLIP should know the shapes a little"
    # The tiny backbone leaves prompt learning no headroom over zero-shot (measured: every method within 0.6 points
    # of it), so the order of the methods is noise and not asserted. What must hold: no trained method collapses.
    for method in {r["method"] for r in runs} - {"zeroshot", "linear-probe", "fedotp"}:
        assert abs(_avg(runs, method) - zeroshot) < 5, f"{method} drifted far from zero-shot: a training bug?"
    # the probe reads no text: it only needs the frozen features to tell the shapes apart across styles
    assert _avg(runs, "linear-probe") > chance + 10, "the linear probe did not learn: a training bug?"
    # FedOTP predicts from the patch tokens, which the tiny CLIP's pretraining (pooled features only) never aligns
    # with text: it sits well below zero-shot (measured 30.5 %), but must still be clearly above chance.
    assert _avg(runs, "fedotp") > chance + 5, "FedOTP at chance: the OT over patch tokens is broken"


@pytest.mark.slow
def test_quick_demo_config_reruns_to_the_same_numbers(tmp_path):
    _trip("demo", "--quick", "--out", str(tmp_path / "quick"))
    _trip("run", str(tmp_path / "quick" / "config.yaml"), "--out", str(tmp_path / "again"))
    first, second = _runs(tmp_path / "quick"), _runs(tmp_path / "again")
    for run in first + second:
        run.pop("time_s")
    assert first == second
