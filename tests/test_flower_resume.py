"""Resume under Flower: `trip run --engine flower` SIGKILLed (its whole process group, the local federation with
it) after the second round's checkpoint, then `--resume`, equals an uninterrupted Flower run: results.json,
rounds.jsonl (each round once) and the final tensors; for the test-only method with private client state and for
TRIP. The private tensors stay in the nodes' folders, never in the server's checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from patience import PATIENCE_S
from safetensors.torch import load_file

from trip.checkpoint import RunCheckpoints

TESTS = Path(__file__).parent
CONFIG = {"name": "flower-resume", "seeds": [2], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
          "data": {"name": "synthetic", "images_per_class": 3, "targets": ["photo"]},
          "train": {"rounds": 3, "batch_size": 8, "lr": 0.002},
          "methods": [{"name": "contract-test"}, {"name": "trip", "num_experts": 2, "n_ctx": 2, "kmeans_iters": 5}]}
KEYS = {"contract-test": "contract-test__photo__seed2", "trip": "trip__photo__seed2"}


def _env() -> dict[str, str]:
    """Read when a test runs, not at import: by then tests/conftest.py has pointed TRIP_CACHE at the suite's own
    cache (an environment copied at import would send the runs to the user's)."""
    return {**os.environ, "TRIP_PLUGINS": "contract_method",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


def _run(config: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trip.cli", "run", str(config), "--engine", "flower", "--out",
                             str(out), *extra], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=PATIENCE_S)
    assert proc.returncode == 0, err


def _kill_after_second_round(proc: subprocess.Popen, out: Path, label: str) -> None:
    second = out / "checkpoints" / KEYS[label] / "round-0001.safetensors"
    deadline = time.time() + PATIENCE_S
    while not second.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = json.loads((out / "results.json").read_text())["runs"] if (out / "results.json").exists() else []
    assert second.exists() and label not in [r["method"] for r in finished], "the run ended before it was killed"


def _comparable(out: Path) -> tuple[list[dict], list[dict]]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    for record in runs + rounds:
        record.pop("time_s", None)
    return runs, rounds


def _final_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for label, key in KEYS.items():
        last = RunCheckpoints(out / "checkpoints" / key).files()[-1]
        tensors |= {f"{key}/{k}": v for k, v in load_file(last).items()}
        models = out / "flower" / f"{label}-photo-seed2" / "models.safetensors"
        tensors |= {f"{label}/models/{k}": v for k, v in load_file(models).items()}
    return tensors


@pytest.mark.flower
def test_sigkilled_flower_run_resumes_to_an_uninterrupted_run(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    _finish(_run(config, tmp_path / "straight"))

    killed = tmp_path / "killed"
    _kill_after_second_round(_run(config, killed), killed, "contract-test")
    nodes = sorted(p.name for p in (killed / "checkpoints" / KEYS["contract-test"]).glob("node-*"))
    assert nodes == ["node-cartoon", "node-painting", "node-sketch"]
    _kill_after_second_round(_run(config, killed, "--resume"), killed, "trip")
    _finish(_run(config, killed, "--resume"))

    runs, rounds = _comparable(killed)
    assert (runs, rounds) == _comparable(tmp_path / "straight")
    assert sorted((r["method"], r["round"]) for r in rounds) == [(m, i) for m in sorted(KEYS) for i in range(3)]
    a, b = _final_tensors(killed), _final_tensors(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.split("/")[1].startswith("private") for k in a), "a private tensor travelled"


def test_private_store_gives_a_clients_newest_round_before_the_asked_one_and_keeps_three(tmp_path):
    from trip.federation.flower.private_store import PrivateStore

    run = SimpleNamespace(method="m", target="photo", seed=2, checkpoint_dir=str(tmp_path / "ckpt"))
    store = PrivateStore.of({"state-dir": str(tmp_path)}, run, "sketch")
    assert store.folder == tmp_path / "m__photo__seed2" / "node-sketch"
    assert PrivateStore.of({"partition-id": 4}, run, "sketch").folder == tmp_path / "ckpt" / "node-sketch"  # simulated
    assert PrivateStore.of({"domain": "sketch"}, run, "sketch") is None  # a deployed node without a state-dir
    for r in (0, 2, 3, 5):
        store.save(1, r, {"p": torch.full((2,), float(r))})
    store.save(0, 4, {"p": torch.zeros(2)})
    assert sorted(p.name for p in store.folder.iterdir()) == \
        ["client-0.round-0004.safetensors", *(f"client-1.round-000{r}.safetensors" for r in (2, 3, 5))]
    assert store.latest_before(1, 5)["p"].tolist() == [3.0, 3.0]  # round 5 may be the killed run's: trained again
    assert store.latest_before(1, 6)["p"].tolist() == [5.0, 5.0]
    assert store.latest_before(1, 2) is None and store.latest_before(2, 9) is None


def test_checkpoint_keeps_the_clients_uploads(tmp_path):
    from trip.checkpoint import FederationState

    uploads = [{"offset": torch.ones(3)}, {"offset": torch.full((3,), 2.0)}]
    RunCheckpoints(tmp_path).save(FederationState(2, {"w": torch.zeros(1)}, None, 0.0, [{"round": 1}], [], uploads))
    state = RunCheckpoints(tmp_path).latest()
    assert state.privates == [] and [u["offset"].tolist() for u in state.uploads] == [[1.0] * 3, [2.0] * 3]
