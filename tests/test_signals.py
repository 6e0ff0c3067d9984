"""Signals end everything trip started (issue 12): SIGTERM through the process group, as a shell sends it, stops
`trip run --engine flower` with its SuperLink, SuperNodes and workers and removes their FLWR_HOME; if trip is
SIGKILLed, the kernel kills them. Every process of a test's trip carries a marker in its environment, so
/proc tells which of them are alive. A SIGKILLed trip's FLWR_HOME is removed by the next federation."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml
from patience import PATIENCE_S

from trip.cli import main
from trip.federation.flower.home import make_home, remove_home, remove_orphaned_homes
from trip.federation.flower.local import LocalFederation
from trip.lost_clients import lost_clients
from trip.run_lock import LOCK_FILE

CONFIG = {
    "name": "signal-test", "seeds": [3], "device": "cpu",
    "backbone": {"name": "tiny", "pretrained": None},
    "data": {"name": "synthetic", "images_per_class": 4, "targets": ["photo"]},
    "train": {"rounds": 4, "batch_size": 8, "lr": 0.002},
    "methods": [{"name": "trip", "num_experts": 2, "n_ctx": 2, "kmeans_iters": 5}],
}


def marked(marker: str) -> dict[int, dict[str, str]]:
    """pid -> environment of every live process carrying `marker` (a zombie's environment reads empty)."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            raw = (entry / "environ").read_bytes() if entry.name.isdigit() else b""
        except OSError:
            continue
        env = dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)
        if env.get("TRIP_TEST_MARKER") == marker:
            found[int(entry.name)] = env
    return found


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


def start_trip(args: list[str], marker: str) -> subprocess.Popen:
    """`trip ...` as a shell starts a job: in a process group of its own, marked."""
    env = {**os.environ, "TRIP_TEST_MARKER": marker}
    return subprocess.Popen([sys.executable, "-m", "trip.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def rounds_of(out: Path) -> list[int]:
    log = out / "rounds.jsonl"
    return [json.loads(line)["round"] for line in log.read_text().splitlines()] if log.is_file() else []


def evaluating_round_one(out: Path) -> bool:
    """SuperNode 0 has been sent round 1's evaluate message and has not answered it yet (or just has): the
    moment a SuperNode stopped before the ServerApp left it out of round 1's validation."""
    log = out / "flower" / "logs" / "supernode0.log"
    received = log.read_text(errors="replace").count("Receiving: evaluate message") if log.is_file() else 0
    return received >= 2  # round 0's, round 1's


def flower_run_in_round_one(tmp_path: Path, ready=rounds_of) -> tuple[subprocess.Popen, str, Path, Path]:
    """A `trip run --engine flower` in its round 1, by default once it has logged round 0: (process, marker, run
    folder, FLWR_HOME)."""
    config, out, marker = tmp_path / "exp.yaml", tmp_path / "run", uuid.uuid4().hex
    config.write_text(yaml.safe_dump(CONFIG))
    proc = start_trip(["run", str(config), "--engine", "flower", "--out", str(out)], marker)
    wait_until(lambda: ready(out) or proc.poll() is not None, PATIENCE_S, "round 1")
    assert proc.poll() is None, proc.stderr.read()
    homes = {env["FLWR_HOME"] for pid, env in marked(marker).items() if pid != proc.pid and "FLWR_HOME" in env}
    assert len(homes) == 1
    return proc, marker, out, Path(homes.pop())


def lock_holders(out: Path, pids) -> list[int]:
    lock = str((out / LOCK_FILE).resolve())
    holders = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue
        holders += [pid] if lock in links else []
    return holders


def comparable(out: Path) -> tuple[list[dict], list[dict]]:
    """results.json's entries and rounds.jsonl's records, without their times."""
    runs = json.loads((out / "results.json").read_text())["runs"]
    rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in runs + rounds], rounds


@pytest.mark.flower
def test_sigterm_during_a_round_stops_every_flower_process_and_resume_gives_the_uninterrupted_results(tmp_path):
    """Stopped while its SuperNodes evaluate round 1, the run checkpoints no round without them (issue 22: the
    ServerApp went on without the stopped SuperNodes), and `--resume` ends with the results of a run never
    stopped (the in-process engine's: the same numbers, tests/test_flower.py), each round logged once."""
    proc, marker, out, home = flower_run_in_round_one(tmp_path, ready=evaluating_round_one)
    started = marked(marker)
    assert len(started) >= 9  # trip, the SuperLink, its ServerApp worker, 3 SuperNodes and their workers
    assert lock_holders(out, started) == [proc.pid]  # the run folder's lock stays with trip
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=PATIENCE_S) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "Traceback" not in err
    assert f"interrupted (SIGTERM): no run in {out} had finished yet; " in err
    assert f"--engine flower --out {out} --resume` continues the run" in err
    assert marked(marker) == {}
    assert not home.exists()

    assert main(["run", str(tmp_path / "exp.yaml"), "--out", str(out), "--resume"]) == 0
    assert rounds_of(out) == list(range(CONFIG["train"]["rounds"]))
    assert main(["run", str(tmp_path / "exp.yaml"), "--out", str(tmp_path / "straight")]) == 0
    resumed, rounds = comparable(out)
    assert resumed == comparable(tmp_path / "straight")[0]
    assert [r["round"] for r in rounds if lost_clients(r)] == []
    assert "lost clients" not in (out / "summary.md").read_text()


@pytest.mark.flower
def test_sigkill_of_trip_takes_every_flower_process_with_it(tmp_path):
    proc, marker, out, home = flower_run_in_round_one(tmp_path)
    proc.kill()
    proc.wait()
    try:
        wait_until(lambda: not marked(marker), PATIENCE_S, "every process of the killed trip gone")
    finally:
        for pid in marked(marker):  # only if the check failed: leave nothing behind
            os.kill(pid, signal.SIGKILL)
    assert rounds_of(out) and not (out / "results.json").exists()
    assert home.is_dir()  # nobody was left to remove it: the next federation does
    LocalFederation([], tmp_path / "logs").stop()
    assert not home.exists()


def test_a_flwr_home_is_removed_once_its_trip_is_gone_and_never_before(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "from trip.federation.flower.home import make_home\n"
                             "print(make_home()[0], flush=True)\nimport time\ntime.sleep(600)"],
                            stdout=subprocess.PIPE, text=True)
    dead_home = Path(dead.stdout.readline().strip())
    dead.kill()
    dead.wait()
    live_home, fd = make_home()
    try:
        remove_orphaned_homes()
        assert live_home.is_dir() and not dead_home.exists()
    finally:
        remove_home(live_home, fd)
    assert not live_home.exists()


def test_a_spawned_process_dies_with_the_process_that_spawned_it(tmp_path):
    """Without Flower: a Python process spawns `sleep` as the federation does, and is SIGKILLed."""
    marker = uuid.uuid4().hex
    parent = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom trip.federation.flower.local import "
                               "spawn\nspawn(['sleep', '600'])\nprint('up', flush=True)\ntime.sleep(600)"],
                              env={**os.environ, "TRIP_TEST_MARKER": marker}, stdout=subprocess.PIPE, text=True)
    assert parent.stdout.readline() == "up\n"
    [sleeper] = [pid for pid in marked(marker) if pid != parent.pid]
    parent.kill()
    parent.wait()
    try:
        wait_until(lambda: not marked(marker), PATIENCE_S, "the sleep gone with its parent")
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
    assert sleeper not in marked(marker)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_trip_flower_supernode_takes_its_supernode_and_worker_along(tmp_path, sig):
    """A site's SuperNode (retrying a SuperLink that is not there) and its worker end with `trip flower supernode`,
    stopped in order on SIGTERM, killed by the kernel on SIGKILL."""
    from trip.federation.flower.certs import make_certs
    from trip.federation.flower.local import free_port

    make_certs(tmp_path / "certs", [], nodes=1)
    marker = uuid.uuid4().hex
    proc = start_trip(["flower", "supernode", "--superlink", f"127.0.0.1:{free_port()}",
                       "--ca", str(tmp_path / "certs" / "ca.crt"), "--key", str(tmp_path / "certs" / "node0.key"),
                       "--domain", "sketch", "--data-root", str(tmp_path), "--runtime-port", str(free_port())],
                      marker)
    wait_until(lambda: len(marked(marker)) == 3 or proc.poll() is not None, PATIENCE_S, "the SuperNode and its worker")
    assert proc.poll() is None, proc.stderr.read()
    os.killpg(proc.pid, sig)
    assert proc.wait(timeout=PATIENCE_S) == (128 + sig if sig == signal.SIGTERM else -sig)
    try:
        wait_until(lambda: not marked(marker), PATIENCE_S, "the SuperNode and its worker gone")
    finally:
        for pid in marked(marker):
            os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert proc.stderr.read().strip().splitlines()[-1] == "interrupted (SIGTERM)"


TRIP_SCRIPT = "import sys; from trip.__main__ import main; sys.exit(main())"  # what pip's `trip` script runs


def _ctrl_c_as_at_a_terminal() -> None:
    """A suite started in the background (`pytest &` from a script) has SIGINT ignored, and Python keeps an ignored
    SIGINT ignored: the child gets Ctrl-C's default disposition, as a command typed at a terminal has."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _importing_the_cli(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Returns once the process has loaded pydantic's compiled core: trip.cli is importing (trip.config needs it),
    past the interpreter's own start-up, which no program can guard."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if "pydantic_core" in Path(f"/proc/{proc.pid}/maps").read_text():
            return
        time.sleep(0.005)
    pytest.fail("trip never imported pydantic")


def test_ctrl_c_while_trip_starts_is_one_line_and_exit_130(tmp_path):
    """The `trip` command's entry point (pyproject.toml) catches a Ctrl-C that comes while the CLI's modules are
    still importing, before `trip.cli.main` arms its handlers: a 47-line traceback before (issue 22). The delays
    after the import began span the import phase and the start of the run."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'trip = "trip.__main__:main"' in pyproject
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    for n, delay in enumerate((0.0, 0.2, 0.6, 1.5)):
        argv = [sys.executable, "-c", TRIP_SCRIPT, "run", str(config), "--out", str(tmp_path / str(n))]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ctrl_c_as_at_a_terminal)
        _importing_the_cli(proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, (delay, err)
        assert err.startswith("interrupted (SIGINT)"), err
