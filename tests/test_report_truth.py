"""`trip report` tells the truth: an unfinished run folder is marked and what it lacks is named, no cell is
averaged over fewer seeds than planned without saying so, nothing is written into the run folders it reads,
and damaged run folders or a bad --out end in one message (issue 12, parts 5 and 6)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trip.cli import main
from trip.config import load_config, parse_config
from trip.experiment import run_experiment
from trip.report import load_runs
from trip.results import Planned, table_rows, write_summary


@pytest.fixture(scope="module")
def complete(tmp_path_factory) -> Path:
    """A finished run: 2 seeds × 2 methods × 2 held-out domains = 8 entries (tiny random CLIP)."""
    cfg = parse_config({
        "name": "truth", "seeds": [0, 1], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
        "data": {"name": "synthetic", "images_per_class": 4, "targets": ["photo", "sketch"]},
        "train": {"rounds": 1, "batch_size": 16},
        "methods": [{"name": "zeroshot", "templates": "single"}, {"name": "promptfl", "n_ctx": 2}],
    })
    out = tmp_path_factory.mktemp("runs") / "complete"
    run_experiment(cfg, out)
    return out


def _unfinished(complete: Path, dest: Path, keep: int) -> Path:
    """The folder an interrupted run leaves: results.json holds the first `keep` entries (it is rewritten after
    each one), no figures (they are drawn when the last one ends), and rounds.jsonl may end in a line cut short."""
    shutil.copytree(complete, dest)
    shutil.rmtree(dest / "figures")
    with (dest / "rounds.jsonl").open("a") as log:
        log.write('{"method": "promptfl", "target": "sketch", "seed": 1, "rou')
    doc = json.loads((dest / "results.json").read_text())
    doc["runs"] = doc["runs"][:keep]
    (dest / "results.json").write_text(json.dumps(doc))
    return dest


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_unfinished_run_is_marked_and_what_it_lacks_is_named(complete, tmp_path, capsys):
    half = _unfinished(complete, tmp_path / "half", keep=5)
    before = {d: _snapshot(d) for d in (complete, half)}
    out = tmp_path / "rep" / "report.md"
    assert main(["report", str(complete), str(half), "--out", str(out), "--html"]) == 0
    text = out.read_text()
    assert "| complete | truth |" in text and "| finished |" in text
    assert "| unfinished: 5 of 8 runs |" in text
    assert ("missing zeroshot held out sketch (seed 1); promptfl held out photo (seed 1); "
            "promptfl held out sketch (seed 1)") in text
    assert {d: _snapshot(d) for d in (complete, half)} == before  # nothing written into the run folders
    assert not (half / "figures").exists()
    drawn = sorted(p.name for p in (tmp_path / "rep" / "report-figures" / "half").glob("*.png"))
    assert drawn == ["accuracy.png", "communication.png", "train_loss.png"]
    assert "report-figures/half/accuracy.png" in text


def test_cells_over_fewer_seeds_than_planned_say_so(complete, tmp_path):
    half = _unfinished(complete, tmp_path / "half", keep=5)
    (full,) = load_runs([complete])
    (part,) = load_runs([half])
    _, rows = table_rows(full.runs, full.dataset, full.planned)
    assert all("seeds)" not in cell for row in rows for cell in row)
    header, rows = table_rows(part.runs, part.dataset, part.planned)
    assert header == ["method", "photo", "sketch", "avg", "params/round"]
    zeroshot, promptfl = rows
    accs = {(r["method"], r["target"], r["seed"]): r["acc"] for r in part.runs}
    assert zeroshot[1] == rows_of(full)[0][1]  # both seeds there: the complete run's cell
    assert zeroshot[2] == f"{accs['zeroshot', 'sketch', 0]:.2f} (1/2 seeds)"
    assert zeroshot[3] == f"{(accs['zeroshot', 'photo', 0] + accs['zeroshot', 'sketch', 0]) / 2:.2f} (1/2 seeds)"
    assert promptfl[1:4] == [f"{accs['promptfl', 'photo', 0]:.2f} (1/2 seeds)",
                             f"{accs['promptfl', 'sketch', 0]:.2f} (1/2 seeds)",
                             f"{(accs['promptfl', 'photo', 0] + accs['promptfl', 'sketch', 0]) / 2:.2f} (1/2 seeds)"]


def rows_of(run) -> list[list[str]]:
    return table_rows(run.runs, run.dataset, run.planned)[1]


def test_a_run_that_finished_nothing_is_reported_as_such(complete, tmp_path):
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(complete / "config.yaml", started / "config.yaml")
    out = tmp_path / "report.md"
    assert main(["report", str(started), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| unfinished: 0 of 8 runs |" in text and "missing zeroshot held out photo (seed 0);" in text
    assert "| started | zeroshot | — | — | — | — |" in text
    assert sorted(p.name for p in started.iterdir()) == ["config.yaml"]


def test_rounds_that_lost_clients_are_named_by_the_report_and_the_summary(complete, tmp_path):
    """A run that completed although a round went on without a client (a node that went offline under Flower):
    `trip report` and summary.md name the round and the client; the untouched folder has no such section."""
    lossy = tmp_path / "lossy"
    shutil.copytree(complete, lossy)
    records = [json.loads(line) for line in (lossy / "rounds.jsonl").read_text().splitlines()]
    [short] = [r for r in records if (r["method"], r["target"], r["seed"], r["round"]) == ("promptfl", "photo", 1, 0)]
    short["participants"].remove("sketch")  # "failed" stays {}: what a stopped Flower run once wrote
    (lossy / "rounds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "rep" / "report.md"
    assert main(["report", str(complete), str(lossy), "--out", str(out)]) == 0
    text = out.read_text()
    named = "- promptfl, held out photo, seed 1: round 0: sketch (asked to train, sent no accepted update)"
    assert "## Rounds that lost clients" in text and f"### lossy\n\n{named}" in text
    assert "### complete" not in text.split("## Rounds that lost clients")[1].split("## Target accuracy")[0]
    cfg = load_config(lossy / "config.yaml")
    assert named in write_summary(lossy, cfg, json.loads((lossy / "results.json").read_text())["runs"])
    assert "lost clients" not in (complete / "summary.md").read_text()


def test_planned_runs_follow_the_config():
    cfg = parse_config({"seeds": [3, 1], "data": {"name": "pacs"},
                        "methods": [{"name": "trip"}, {"name": "trip", "label": "t2"}]})
    planned = Planned.of(cfg)
    assert (planned.methods, planned.seeds) == (["trip", "t2"], [3, 1])
    assert planned.targets == ["art_painting", "cartoon", "photo", "sketch"]
    runs = [{"method": "trip", "target": t, "seed": 3} for t in planned.targets]
    assert planned.missing(runs) == [("t2", t, 3) for t in planned.targets] + \
        [(m, t, 1) for m in ("trip", "t2") for t in planned.targets]


def _refused(capsys, argv: list[str], *fragments: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_damaged_run_folders_and_bad_outputs_are_refused(complete, tmp_path, capsys):
    out = str(tmp_path / "r.md")
    bad_json = shutil.copytree(complete, tmp_path / "bad-json")
    (bad_json / "results.json").write_text('{"runs": [{"method": "zeroshot", ')
    _refused(capsys, ["report", str(bad_json), "--out", out], "results.json is damaged", "JSONDecodeError")
    wrong = shutil.copytree(complete, tmp_path / "wrong")
    (wrong / "results.json").write_text('{"runs": [{"method": "zeroshot"}]}')
    _refused(capsys, ["report", str(wrong), "--out", out], "does not hold trip results")
    bad_yaml = shutil.copytree(complete, tmp_path / "bad-yaml")
    (bad_yaml / "config.yaml").write_bytes(b"seeds: [0, 1\n\xff")
    _refused(capsys, ["report", str(bad_yaml), "--out", out], f"run folder {bad_yaml} is damaged", "not UTF-8")
    (bad_yaml / "config.yaml").write_text("seeds: [0, 1\n")
    _refused(capsys, ["report", str(bad_yaml), "--out", out], "not valid YAML")
    _refused(capsys, ["report", str(tmp_path / "nothing"), "--out", out], "is not a run folder")
    _refused(capsys, ["report", str(complete), "--out", str(tmp_path)], "is a folder", "report.md")
    (tmp_path / "file").write_text("")
    _refused(capsys, ["report", str(complete), "--out", str(tmp_path / "file" / "r.md")], "is a file, not a folder")
    _refused(capsys, ["report", str(complete), "--out", "/proc/trip-test/r.md"], "cannot write there")
    assert not (tmp_path / "r.md").exists()


def test_by_default_the_report_lands_beside_the_first_run_folder(complete, tmp_path, monkeypatch, capsys):
    before = _snapshot(complete)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["report", str(complete), "--html"]) == 0
    written = [complete.parent / "complete-report.md", complete.parent / "complete-report.html"]
    assert capsys.readouterr().out.split() == [str(p) for p in written]
    assert all(p.is_file() for p in written)
    assert list(elsewhere.iterdir()) == [] and _snapshot(complete) == before
    monkeypatch.chdir(complete)
    assert main(["report", "."]) == 0
    assert capsys.readouterr().out.split() == [str(complete.parent / "complete-report.md")]
    assert _snapshot(complete) == before
