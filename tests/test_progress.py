"""Progress off a terminal is plain lines (a start, one every so often, an end), on a terminal tqdm's bar; and two
first runs at once pretrain the tiny CLIP once: the second waits on a lock, then loads the first one's file."""

import io
import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from tqdm import tqdm

from trip.progress import LineProgress, progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def lines(total=None, unit="steps", unit_scale=False, initial=0, every_s=20.0):
    stream, clock = io.StringIO(), Clock()
    bar = LineProgress(None, desc="  phase", total=total, unit=unit, unit_scale=unit_scale, initial=initial,
                       stream=stream, every_s=every_s, clock=clock)
    return bar, stream, clock


def test_a_phase_off_a_terminal_writes_a_start_line_a_line_every_interval_and_an_end_line():
    bar, stream, clock = lines(total=10)
    for _ in range(10):
        clock.now += 7
        bar.update()
    bar.set_postfix(val="51.2")
    bar.close()
    bar.close()
    assert stream.getvalue().splitlines() == [
        "phase: started (10 steps)",
        "phase: 3/10 steps, 7.0 s each, 21 s",
        "phase: 6/10 steps, 7.0 s each, 42 s",
        "phase: 9/10 steps, 7.0 s each, 63 s",
        "phase: done: 10/10 steps, 7.0 s each, 70 s, val=51.2",
    ]


def test_fast_phases_give_a_rate():
    bar, stream, clock = lines(total=None, unit="images")
    clock.now += 4
    bar.update(1000)
    bar.close()
    assert stream.getvalue().splitlines() == ["phase: started", "phase: done: 1,000 images, 250 images/s, 4 s"]


def test_a_phase_cut_short_says_where_it_stopped_and_bytes_read_as_sizes():
    bar, stream, clock = lines(total=3_000_000, unit="B", unit_scale=True, initial=1_000_000)
    with bar:
        clock.now += 2
        bar.update(500_000)
    assert stream.getvalue().splitlines() == ["phase: started (3.00MB)",
                                              "phase: stopped at 1.50M/3.00MB, 250kB/s, 2 s"]


def test_iterating_counts_every_item_and_ends_the_phase_even_when_the_loop_breaks():
    stream = io.StringIO()
    for _ in progress(range(5), desc="loop", stream=stream):
        pass
    for i in progress(iter(range(5)), desc="cut", total=5, stream=stream):
        if i == 1:
            break
    out = stream.getvalue().splitlines()
    assert out[0] == "loop: started (5 it)" and out[1].startswith("loop: done: 5/5 it, ")
    assert out[2] == "cut: started (5 it)" and out[3].startswith("cut: stopped at 1/5 it, ")
    assert len(out) == 4


def test_on_a_terminal_progress_is_tqdms_bar():
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = progress(range(3), desc="bar", stream=terminal)
        assert isinstance(bar, tqdm)
        list(bar)
    os.close(leader)


@pytest.mark.slow
def test_a_run_logged_to_a_file_reads_as_lines(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "name": "log-lines", "seeds": [0], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
        "data": {"name": "synthetic", "images_per_class": 3, "targets": ["photo"]},
        "train": {"rounds": 2, "batch_size": 8}, "methods": [{"name": "promptfl", "n_ctx": 2}]}))
    log = tmp_path / "run.log"
    with log.open("w") as err:
        done = subprocess.run([sys.executable, "-m", "trip.cli", "run", str(config), "--out", str(tmp_path / "run")],
                              env={**os.environ, "TRIP_CACHE": str(tmp_path / "cache")}, stdout=subprocess.PIPE,
                              stderr=err, text=True, timeout=600)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    for domain in ("photo", "cartoon", "sketch", "painting"):  # features of every domain, computed afresh
        assert f"frozen features {domain}: started (1 batches)" in lines
        assert any(line.startswith(f"frozen features {domain}: done: 1/1 batches, ") for line in lines)
    run = "promptfl | held out photo | seed 0"
    assert f"{run}: started (2 rounds)" in lines
    assert any(line.startswith(f"{run}: done: 2/2 rounds, ") and ", target=" in line for line in lines)


FIRST_RUN = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from trip import pretrain

    pretrain.RECIPE = {**pretrain.RECIPE, "images": 48, "steps": 2, "groups": 2}
    real = pretrain.pretrain

    def counted(model, *args):
        with open(os.environ["PRETRAINED_BY"], "a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(3)  # the other process reaches the lock while this one holds it
        real(model, *args)

    pretrain.pretrain = counted
    Path(sys.argv[1]).touch()
    while not Path(sys.argv[2]).exists():
        time.sleep(0.01)
    model, identity = pretrain.pretrained_tiny_clip()
    print(identity, float(sum(t.double().sum() for t in model.state_dict().values())))
""")


@pytest.mark.slow
def test_two_first_runs_at_once_pretrain_the_tiny_clip_once(tmp_path):
    env = {**os.environ, "TRIP_CACHE": str(tmp_path / "cache"), "PRETRAINED_BY": str(tmp_path / "pretrained-by")}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_RUN, str(tmp_path / f"ready{i}"), str(go)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert len((tmp_path / "pretrained-by").read_text().splitlines()) == 1
    assert outs[0][0] == outs[1][0]  # the same weights: the second loaded the first one's file
    waited = [err for _, err in outs if "waiting for another trip process pretraining the tiny CLIP" in err]
    assert len(waited) == 1, outs
    assert "pretraining tiny CLIP on synthetic captions (once): started (2 steps)" not in waited[0]
