"""One run folder, one writer (issue 12): a second run into a folder in use is refused at once, a crashed run's
lock never blocks its resume, SIGTERM stops an in-process run cleanly, damaged run folders and bad --out
folders end in one message, and a refused start leaves nothing that blocks the corrected rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from patience import PATIENCE_S

from trip.cli import _default_out, main
from trip.run_lock import LOCK_FILE

ROUNDS = 30  # the first of two concurrent runs must outlast the second's start (~1 s)
CONFIG = {
    "name": "lock-test", "seeds": [3], "device": "cpu",
    "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 4, "targets": ["sketch"]},
    "train": {"rounds": ROUNDS, "batch_size": 8, "lr": 0.01},
    "methods": [{"name": "trip", "n_ctx": 2, "num_experts": 2, "kmeans_iters": 5}],
}


# `trip` with torch unimportable: its refusal shows the folder lock is checked before torch is imported, at any load
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; from trip.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(CONFIG))
    return path


def start(*args: str) -> subprocess.Popen:
    """`trip ...` in a session of its own, as a shell starts a job."""
    return subprocess.Popen([sys.executable, "-m", "trip.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_rounds(out: Path, proc: subprocess.Popen, n: int = 1, timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if len(rounds_of(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"no {n} round records: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


def rounds_of(out: Path) -> list[int]:
    log = out / "rounds.jsonl"
    return [json.loads(line)["round"] for line in log.read_text().splitlines()] if log.is_file() else []


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_at_once_and_the_first_completes(config, tmp_path):
    out = tmp_path / "run"
    first = start("run", str(config), "--out", str(out))
    wait_for_rounds(out, first)
    no_plugins = {k: v for k, v in os.environ.items() if k != "TRIP_PLUGINS"}  # set by other modules; they import torch
    second = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "run", str(config), "--out", str(out)],
                            capture_output=True, text=True, timeout=PATIENCE_S, env=no_plugins)
    assert first.poll() is None, "the first run ended before the second started: make it longer"
    assert second.returncode == 2, second.stderr
    assert f"run folder {out} is in use by pid {first.pid}" in second.stderr
    assert "run " + str(config) in second.stderr  # the holder's command
    assert first.wait(timeout=PATIENCE_S) == 0, first.stderr.read()
    assert rounds_of(out) == list(range(ROUNDS))
    assert len(json.loads((out / "results.json").read_text())["runs"]) == 1


@pytest.mark.slow
def test_sigterm_to_a_process_group_stops_an_in_process_run_cleanly_and_a_killed_run_leaves_no_stuck_lock(
        config, tmp_path):
    out = tmp_path / "run"
    proc = start("run", str(config), "--out", str(out))
    wait_for_rounds(out, proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=PATIENCE_S) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert f"interrupted (SIGTERM): no run in {out} had finished yet; " in err
    assert f"--out {out} --resume` continues the run" in err

    proc = start("run", str(config), "--out", str(out), "--resume")
    wait_for_rounds(out, proc, n=len(rounds_of(out)) + 1)
    os.killpg(proc.pid, signal.SIGKILL)  # its lock file stays, its lock goes with it
    proc.wait()
    assert (out / LOCK_FILE).is_file() and not (out / "results.json").exists()

    assert main(["run", str(config), "--out", str(out), "--resume"]) == 0
    assert rounds_of(out) == list(range(ROUNDS))


def test_sigterm_during_start_up_says_there_is_nothing_to_resume(config, tmp_path):
    out = tmp_path / "run"
    proc = start("run", str(config), "--out", str(out))
    deadline = time.monotonic() + PATIENCE_S
    while not (out / LOCK_FILE).is_file() and time.monotonic() < deadline:  # locked, torch not yet imported
        time.sleep(0.01)
    assert not (out / "config.yaml").exists()
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=PATIENCE_S) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert err.strip().splitlines()[-1] == ("interrupted (SIGTERM): stopped during start-up, before the run began; "
                                            "nothing to resume")
    assert "results.json" not in err and not (out / "config.yaml").exists()


def test_a_refused_start_leaves_no_config_behind(config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    bad = {**CONFIG, "data": {**CONFIG["data"], "targets": ["sketch"], "name": "pacs", "root": str(tmp_path)}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    assert main(["run", str(tmp_path / "bad.yaml"), "--out", str(out)]) == 2
    assert "holds no pacs folder" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert list((tmp_path / "runs").iterdir()) == []  # the default run folder made for it is gone again
    assert main(["run", str(config), "--out", str(out), "--set", "train.rounds=1"]) == 0
    assert rounds_of(out) == [0]


@pytest.mark.parametrize("damage, message", [
    (("config.yaml", b"\xff\xfe not text"), "config.yaml is not text (not UTF-8)"),
    (("config.yaml", b"a: [unclosed"), "config.yaml is not YAML"),
    (("config.yaml", b"just a string"), "config.yaml is not a trip config"),
    (("results.json", b"{not json"), "results.json is not a trip results file"),
    (("results.json", b'{"runs": [1, 2]}'), "results.json is not a trip results file"),
    (("results.json", b"\xff\xfe"), "results.json is not text (not UTF-8)"),
])
def test_a_damaged_run_folder_is_one_message(config, tmp_path, capsys, damage, message):
    from trip.config import dump_config, load_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(dump_config(load_config(config)))
    name, data = damage
    (out / name).write_bytes(data)
    assert main(["run", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err and str(out / name) in err


def test_an_out_that_is_a_file_or_unwritable_is_one_message(config, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["run", str(config), "--out", str(tmp_path / "file")]) == 2
    assert f"run folder {tmp_path / 'file'} is a file: choose another --out" in capsys.readouterr().err
    assert main(["run", str(config), "--out", str(tmp_path / "file" / "run")]) == 2
    assert f"is inside a file ({tmp_path / 'file'})" in capsys.readouterr().err
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o555)
    assert main(["run", str(config), "--out", str(locked / "run")]) == 2
    assert f"run folder {locked / 'run'} cannot be written (Permission denied)" in capsys.readouterr().err


def test_default_run_folders_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    folders = [_default_out("exp") for _ in range(3)]
    assert [f.name for f in folders] == ["exp-20260101-000000", "exp-20260101-000000-2", "exp-20260101-000000-3"]
    assert all(f.is_dir() for f in folders)


@pytest.mark.parametrize("refused, message, fix", [
    (["federation.clients_per_domain=50"], "too few for 50 clients", ["federation.clients_per_domain=2"]),
    (["methods=[{name: fedapt, n_ctx: 2, sources: 5}]"], "sources is 5 but this run has 3 source clients",
     ["methods=[{name: fedapt, n_ctx: 2, sources: 3}]"]),
])
def test_a_config_refused_at_start_writes_nothing_so_the_corrected_one_runs(config, tmp_path, capsys, refused,
                                                                            message, fix):
    out = tmp_path / "run"
    flags = ["--set", "train.rounds=1", *(x for o in refused for x in ("--set", o))]
    assert main(["run", str(config), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == [LOCK_FILE]
    assert main(["run", str(config), "--out", str(out), "--set", "train.rounds=1",
                 *(x for o in fix for x in ("--set", o))]) == 0, capsys.readouterr().err
    assert rounds_of(out) == [0]


def _pacs_tree(root: Path, per_class: int = 3) -> Path:
    """A PACS-shaped tree of small images: a data set trip does not draw itself."""
    from PIL import Image

    from trip.data.datasets import get_dataset

    spec = get_dataset("pacs")
    for d, domain in enumerate(spec.domains):
        for c, cls in enumerate(spec.classes):
            (root / "pacs" / domain / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (30 * c, 60 * d, 40 * i)).save(root / "pacs" / domain / cls / f"{i}.png")
    return root


def test_a_run_folder_whose_images_changed_is_refused_not_shrunk(tmp_path, capsys):
    """An image deleted between a run's start and its continuation would silently change its clients and what
    they are scored on (issue 22: 71 images instead of 72)."""
    root = _pacs_tree(tmp_path / "data")
    cfg = {**CONFIG, "data": {"name": "pacs", "root": str(root), "targets": ["sketch"]},
           "train": {**CONFIG["train"], "rounds": 1}, "methods": [{"name": "promptfl", "n_ctx": 2}]}
    (tmp_path / "pacs.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "pacs.yaml"), "--out", str(out)]) == 0
    before = (out / "results.json").read_text()
    (root / "pacs" / "photo" / "dog" / "1.png").unlink()
    assert main(["run", str(tmp_path / "pacs.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "images of the run in" in err and "photo" in err and "clients.json" in err, err
    assert (out / "results.json").read_text() == before


@pytest.mark.parametrize("name", ["clients.json", "expert_usage.json"])
def test_a_full_disk_at_a_run_file_is_one_message_and_leaves_no_part_of_it(config, tmp_path, capsys, monkeypatch,
                                                                           name):
    import errno

    write_text = Path.write_text

    def full(path: Path, *args, **kwargs):  # the disk fills at this file's write
        if path.name.startswith(f".{name}."):
            path.touch()
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "run"
    assert main(["run", str(config), "--out", str(out), "--set", "train.rounds=1"]) == 2
    err = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()  # progress bars, then the message
    assert err[-1].startswith(f"error: cannot write {out / name}: No space left on device; it needs ") and \
        "Traceback" not in "".join(err), err
    assert not (out / name).exists() and not list(out.glob(f".{name}*"))
