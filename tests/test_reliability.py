"""Checkpoints and exact resume, safe loading, numerical faults, bad input (issue #6)."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from patience import PATIENCE_S
from safetensors.torch import load_file

from trip.checkpoint import FederationState, RunCheckpoints
from trip.errors import TripError

TINY_TRIP = {
    "name": "resume-test",
    "seeds": [3],
    "device": "cpu",
    "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 10, "targets": ["sketch"]},
    "train": {"rounds": 6, "batch_size": 8, "lr": 0.01},
    "methods": [{"name": "trip", "n_ctx": 4, "teacher": "single"}],
}


def _trip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "trip.cli", *args], capture_output=True, text=True, timeout=PATIENCE_S)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr)
    return proc


def _write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _comparable(run_dir: Path) -> tuple[list[dict], list[dict]]:
    runs = json.loads((run_dir / "results.json").read_text())["runs"]
    rounds = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    for record in runs + rounds:
        record.pop("time_s", None)
    return runs, rounds


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(RunCheckpoints(run_dir / "checkpoints" / "trip__sketch__seed3").files()[-1])


@pytest.mark.slow
def test_sigkill_in_round_3_then_resume_equals_an_uninterrupted_run(tmp_path):
    config = _write_config(tmp_path / "c.yaml", TINY_TRIP)
    _trip("run", str(config), "--out", str(tmp_path / "straight"))

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "trip.cli", "run", str(config), "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second_round_done = killed / "checkpoints" / "trip__sketch__seed3" / "round-0001.safetensors"
    deadline = time.time() + PATIENCE_S
    while not second_round_done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"

    _trip("run", str(config), "--out", str(killed), "--resume")
    assert _comparable(killed) == _comparable(tmp_path / "straight")
    a, b = _final_tensors(killed), _final_tensors(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rounds_a_checkpoint_holds_and_the_log_lacks_are_logged_once_on_resume(tmp_path):
    """A Flower ServerApp checkpoints a round before trip logs it: a kill in between leaves the checkpoint ahead
    of rounds.jsonl. Made here by cutting a finished run back to that state: the resume logs each round once."""
    import shutil

    config = _write_config(tmp_path / "c.yaml", {**TINY_TRIP, "train": {**TINY_TRIP["train"], "rounds": 3}})
    _trip("run", str(config), "--out", str(tmp_path / "straight"))
    gap = tmp_path / "gap"
    shutil.copytree(tmp_path / "straight", gap)
    (gap / "results.json").unlink()
    first = (gap / "rounds.jsonl").read_text().splitlines()[0]
    (gap / "rounds.jsonl").write_text(first + "\n")

    _trip("run", str(config), "--out", str(gap), "--resume")
    assert _comparable(gap) == _comparable(tmp_path / "straight")


def _state(round_idx: int) -> FederationState:
    return FederationState(round_idx, {"experts": torch.full((2, 3), float(round_idx))},
                           {"experts": torch.zeros(2, 3)}, 1.5, [{"round": round_idx - 1}])


def test_truncated_checkpoint_is_reported_and_the_previous_used(tmp_path, capsys):
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(_state(1))
    newest = ckpt.save(_state(2))
    newest.write_bytes(newest.read_bytes()[:-7])
    state = ckpt.latest()
    assert state.next_round == 1 and torch.equal(state.params["experts"], torch.full((2, 3), 1.0))
    assert "corrupt" in capsys.readouterr().err and newest.name in capsys.readouterr().err + str(newest)


def test_bit_flip_is_caught_by_the_checksum(tmp_path, capsys):
    ckpt = RunCheckpoints(tmp_path)
    ckpt.save(_state(1))
    newest = ckpt.save(_state(2))
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0x01
    newest.write_bytes(bytes(data))
    assert ckpt.latest().next_round == 1
    assert "checksum" in capsys.readouterr().err


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PWNED_MARKER']}",))


def test_a_planted_pickle_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    ckpt = RunCheckpoints(tmp_path / "ckpt")
    ckpt.save(_state(1))
    (tmp_path / "ckpt" / "round-0005.safetensors").write_bytes(pickle.dumps(_Exploit()))
    torch.save({"x": _Exploit()}, tmp_path / "ckpt" / "round-0006.safetensors")
    assert ckpt.latest().next_round == 1
    assert not marker.exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = RunCheckpoints(tmp_path)
    good = ckpt.save(_state(1))

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("trip.safefile.save_file", no_space)
    with pytest.raises(TripError, match=r"No space left.*previous checkpoint .*round-0000.* still valid"):
        ckpt.save(_state(2))
    monkeypatch.undo()
    assert ckpt.files() == [good] and ckpt.latest().next_round == 1


def test_only_the_last_two_checkpoints_are_kept(tmp_path):
    ckpt = RunCheckpoints(tmp_path)
    for r in range(1, 5):
        ckpt.save(_state(r))
    assert [p.name for p in ckpt.files()] == ["round-0002.safetensors", "round-0003.safetensors"]


def _bad_input_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    base = _write_config(tmp_path / "ok.yaml", TINY_TRIP)
    unknown = _write_config(tmp_path / "unknown.yaml", {**TINY_TRIP, "train": {"rounds": 2, "lrr": 1}})
    bad_value = _write_config(tmp_path / "bad.yaml", {**TINY_TRIP, "train": {"rounds": -1}})
    no_root = _write_config(tmp_path / "noroot.yaml",
                            {**TINY_TRIP, "data": {"name": "pacs", "root": str(tmp_path / "nowhere")}})
    pacs = tmp_path / "data" / "pacs"
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        (pacs / domain / "dog").mkdir(parents=True)
    missing_class = _write_config(tmp_path / "nocls.yaml",
                                  {**TINY_TRIP, "data": {"name": "pacs", "root": str(tmp_path / "data")}})
    no_weights = _write_config(tmp_path / "noweights.yaml",
                               {**TINY_TRIP, "backbone": {"name": "ViT-B-16", "pretrained": str(tmp_path / "w.pt")}})
    other = tmp_path / "other-run"
    other.mkdir()
    (other / "config.yaml").write_text("name: something else\n")
    return {
        "unknown key": (["run", str(unknown)], "unknown key 'train.lrr'"),
        "bad value": (["run", str(bad_value)], "train.rounds"),
        "missing data root": (["run", str(no_root)], "does not exist"),
        "missing class folders": (["run", str(missing_class)], "missing ['elephant'"),
        "missing weights": (["run", str(no_weights)], "no weights file"),
        "another run's folder": (["run", str(base), "--out", str(other)], "holds a run of another config"),
        "missing config": (["run", str(tmp_path / "none.yaml")], "config file not found"),
    }


@pytest.mark.slow
def test_bad_input_gives_one_message_and_exit_status_2(tmp_path):
    for case, (args, message) in _bad_input_cases(tmp_path).items():
        proc = _trip(*args, check=False)
        assert proc.returncode == 2, (case, proc.stderr)
        assert message in proc.stderr, (case, proc.stderr)
        assert "Traceback" not in proc.stderr, (case, proc.stderr)
