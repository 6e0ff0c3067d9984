"""`trip demo`'s machinery (issue #2 acceptance): the demo command's own path, in this process and with no wall-clock
limit, on its quick config (`--quick`) with the tiny CLIP trip ships; its run folder, table and summary, and a rerun
of the config it wrote. What the full demo learns is the embedded task's learning test, not this one's."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from trip.cli import main
from trip.data import synthetic

METHODS = ["zeroshot", "linear-probe", "promptfl", "trip", "trip-lite", "fedotp", "fedapt"]


def _trip(*args: str) -> str:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(list(args)) == 0
    return stdout.getvalue()


def _runs(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["runs"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, _trip("demo", "--quick", "--out", str(out))


@pytest.mark.slow
def test_demo_runs_every_method_on_every_held_out_domain(demo):
    out, stdout = demo
    runs = _runs(out)
    assert {(r["method"], r["target"]) for r in runs} == {(m, d) for m in METHODS for d in synthetic.DOMAINS}
    assert all(0.0 <= r["acc"] <= 100.0 for r in runs)
    for name in ("config.yaml", "rounds.jsonl", "summary.md"):
        assert (out / name).is_file()
    assert "tiny CLIP" in stdout and "synthetic" in stdout
    for m in METHODS:
        assert m in stdout
        assert f"| {m} |" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_demo_communication_accounting(demo):
    runs = _runs(demo[0])
    comm = {r["method"]: r["comm_params_per_round"] for r in runs}
    width = 64  # the tiny CLIP's text width
    assert comm == {"zeroshot": 0, "linear-probe": 6 * width + 6, "promptfl": 16 * width, "trip": 4 * 8 * width,
                    "trip-lite": 2 * 1 * width, "fedotp": 16 * width, "fedapt": 6 * 16 * width + 3 * width}
    assert all(r["comm_bytes_per_round"] == 4 * r["comm_params_per_round"] for r in runs)


@pytest.mark.slow
def test_quick_demo_config_reruns_to_the_same_numbers(demo, tmp_path):
    out = demo[0]
    _trip("run", str(out / "config.yaml"), "--out", str(tmp_path / "again"))
    first, second = _runs(out), _runs(tmp_path / "again")
    for run in first + second:
        run.pop("time_s")
    assert first == second
