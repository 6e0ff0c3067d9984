"""Bad input ends in exit status 2 and one `error:` message naming the cause and the fix, never a traceback
(issue 12, parts 4 and 5)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from patience import PATIENCE_S

from trip.cli import main

DEMO = Path(__file__).resolve().parents[1] / "src" / "trip" / "configs" / "demo.yaml"


def _refused(capsys, argv: list[str], *fragments: str) -> str:
    """Runs the CLI in this process (an exception other than TripError would fail the test) and checks the
    exit status and the message."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _dry(config: Path | str, *overrides: str) -> list[str]:
    return ["run", str(config), "--dry-run", *(x for o in overrides for x in ("--set", o))]


@pytest.mark.parametrize(("override", "fragments"), [
    ("seeds=[-1]", ("seeds [-1] are out of range", "2**32 - 1")),
    ("seeds=[4294967296]", ("out of range",)),
    ("seeds=[1,2,1]", ("seed 1 is listed more than once", "± 0.00")),
    ("data.targets=[]", ("data.targets", "name at least one", "targets: all")),
    ("data.targets=[photo,sketch,photo]", ("held-out domain photo is listed more than once",)),
    ("methods=[{name: promptfl}, {name: promptfl}]", ("share the label", "distinct `label`")),
    ("train=3", ("key 'train'", "valid dictionary")),
    ("train.rounds.x=1", ("'train.rounds' is the value 8", "--set train.rounds=VALUE")),
    ("train.rounds=[1", ("--set train.rounds is not valid YAML", "line 1")),
    ("seeds.5=1", ("'5' is not an index of a list of 1 items",)),
])
def test_bad_settings_are_refused(capsys, override, fragments):
    _refused(capsys, _dry(DEMO, override), *fragments)


def test_bad_config_files_are_refused(tmp_path, capsys):
    (tmp_path / "latin1.yaml").write_bytes("name: café\nseeds: [1]\n".encode("latin-1"))
    _refused(capsys, _dry(tmp_path / "latin1.yaml"), "not UTF-8", "0xe9", "save the config file as UTF-8")
    (tmp_path / "broken.yaml").write_text("name: [x\nseeds: 1\n")
    _refused(capsys, _dry(tmp_path / "broken.yaml"), "not valid YAML", "line 2, column 6")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(DEMO.read_text())
    _refused(capsys, _dry(tmp_path / "run"), "is a folder, not a config file", str(tmp_path / "run" / "config.yaml"))
    _refused(capsys, _dry(tmp_path / "missing.yaml"), "config file not found")


def test_a_bad_config_gives_one_line_in_a_fresh_process(tmp_path):
    """The message as a user sees it: exit 2, one `error:` line, no traceback."""
    (tmp_path / "latin1.yaml").write_bytes(b"name: \xff\n")
    proc = subprocess.run([sys.executable, "-m", "trip.cli", "run", str(tmp_path / "latin1.yaml")],
                          capture_output=True, text=True, timeout=PATIENCE_S)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")


def test_run_config_output_is_checked(tmp_path, capsys):
    base = ["flower", "run-config", str(DEMO), "--target", "photo", "-o"]
    _refused(capsys, [*base, str(tmp_path)], "is a folder", str(tmp_path / "run.toml"))
    (tmp_path / "file").write_text("")
    _refused(capsys, [*base, str(tmp_path / "file" / "run.toml")], "is a file, not a folder")
    _refused(capsys, [*base, "/proc/trip-test/run.toml"], "cannot write there")
    _refused(capsys, ["flower", "run-config", str(DEMO), "--target", "photo", "--seed", "-1", "-o",
                      str(tmp_path / "r.toml")], "seed -1 is out of range")
    assert not (tmp_path / "r.toml").exists()
    assert main([*base, str(tmp_path / "new" / "run.toml")]) == 0
    assert "seed = 42" in (tmp_path / "new" / "run.toml").read_text()


def _config(path: Path, **data) -> Path:
    cfg = {"name": "t", "seeds": [0], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
           "data": {"name": "synthetic", "images_per_class": 4, "targets": ["photo"], **data},
           "train": {"rounds": 1, "batch_size": 16}, "methods": [{"name": "zeroshot", "templates": "single"}]}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_an_empty_validation_split_is_refused_at_start_and_warned_in_the_dry_run(tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", max_images_per_domain=4)
    assert main(["run", str(config), "--dry-run"]) == 0
    warning = "4 images split into 3 train / 0 validation (data.val_fraction 0.2)"
    out = capsys.readouterr().out
    assert f"cartoon, sketch, painting: {warning}" in out and "data.max_images_per_domain to at least 5" in out
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "run")], warning,
             "no validation accuracy to select a round by", "data.max_images_per_domain to at least 5")
    assert not (tmp_path / "run" / "rounds.jsonl").exists()
    assert main(["run", str(config), "--dry-run", "--set", "data.max_images_per_domain=5"]) == 0
    assert "validation split is empty" not in capsys.readouterr().out


def test_an_empty_train_split_is_refused_at_start(tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", images_per_class=2, val_fraction=0.97)
    assert main(["run", str(config), "--dry-run"]) == 0
    assert "12 images split into 0 train / 11 validation" in capsys.readouterr().out
    _refused(capsys, ["run", str(config), "--out", str(tmp_path / "run")], "0 train / 11 validation",
             "nothing to train on", "data.images_per_class to at least 6")


def test_a_nan_accuracy_is_written_as_null(tmp_path, monkeypatch):
    """Refused configs cannot reach an empty split any more (an empty split is what gives a NaN accuracy), so
    the accuracy itself is made NaN: every file a run writes must still be strict JSON."""
    from trip import experiment
    from trip.config import load_config
    from trip.federation import rounds as protocol

    ws = experiment.prepare(load_config(_config(tmp_path / "c.yaml")))
    ws.cfg.train.rounds = 1
    monkeypatch.setattr(protocol, "accuracy", lambda *args: math.nan)
    out = tmp_path / "run"
    out.mkdir()
    experiment._run_all(ws, out, [], experiment._in_process(ws, out))

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    rounds = [strict(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds and all(r["eval"]["server"]["val_mean"] is None for r in rounds)
    assert all(r["eval"]["server"]["target"] is None for r in rounds)
    (entry,) = strict((out / "results.json").read_text())["runs"]
    assert entry["val_mean"] is None and entry["acc"] is None


def test_a_garbage_archive_in_the_download_folder_is_deleted(tmp_path, capsys):
    """A copy put by hand into the download folder (docs/datasets.md) that is not an archive: no checksum is
    published for PACS, so only reading it can tell."""
    from trip.data.download import DOWNLOADS

    archive = tmp_path / DOWNLOADS / "PACS.zip"
    archive.parent.mkdir()
    archive.write_bytes(b"<html>this is a login page, not a zip</html>" * 10)
    _refused(capsys, ["data", "download", "pacs", "--root", str(tmp_path)], str(archive),
             "not a readable archive", "deleted it", "run the same command again")
    assert not archive.exists() and not (tmp_path / "pacs").exists()


def test_an_image_over_pils_pixel_limit_is_refused_by_viz_routing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    config = _config(tmp_path / "c.yaml")
    cfg = yaml.safe_load(config.read_text())
    cfg["methods"] = [{"name": "trip-lite"}]
    config.write_text(yaml.safe_dump(cfg))
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels: over twice the limit, as PIL refuses
    _refused(capsys, ["viz", "routing", str(tmp_path / "big.png"), "--config", str(config), "--out",
                      str(tmp_path / "maps")], "big.png is too large to open safely", "scale it down")
    assert not (tmp_path / "maps").exists()


def test_a_tiny_backbone_without_weights_named_gets_one_message_in_a_dry_run_and_a_run(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "backbone": {"name": "tiny"}, "methods": [{"name": "promptfl"}]}))
    fix = ("backbone.pretrained 'openai': the tiny CLIP has no open_clip weights", "`pretrained: synthetic`")
    dry = _refused(capsys, _dry(config), *fix)
    ran = _refused(capsys, ["run", str(config), "--out", str(tmp_path / "run")], *fix)
    assert dry == ran and not (tmp_path / "run").exists()


def test_set_takes_several_pairs_at_once_and_again(capsys):
    argv = ["run", str(DEMO), "--dry-run", "--set", "train.rounds=4", "seeds=[0,5]", "--set", "data.images_per_class=3"]
    assert main(argv) == 0
    plan = capsys.readouterr().out
    assert "2 seed(s) [0, 5]" in plan and "; 4 rounds × " in plan
    assert re.search(r"\n  photo +18 ", plan), plan


def test_numbers_that_cannot_be_used_are_refused(tmp_path, capsys):
    """.inf passed `gt=0` and reached numpy's Dirichlet draw; a negative timeout or key count was taken as given."""
    _refused(capsys, _dry(DEMO, "federation.partition=dirichlet", "federation.dirichlet_alpha=.inf"),
             "federation.dirichlet_alpha", "finite number")
    _refused(capsys, _dry(DEMO, "train.lr=.nan"), "train.lr", "finite number")
    for argv, fragment in [(["flower", "run-config", str(DEMO), "--target", "photo", "--round-timeout", "-5"],
                            "--round-timeout: -5 is not a positive number of seconds"),
                           (["flower", "run-config", str(DEMO), "--target", "photo", "--min-clients", "0"],
                            "--min-clients: 0 is below 1"),
                           (["flower", "certs", str(tmp_path / "certs"), "--nodes", "-1"], "--nodes: -1 is below 0"),
                           (["flower", "superlink", "--certs", str(tmp_path), "--port", "70000"], "not a port")]:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and fragment in capsys.readouterr().err
    assert not (tmp_path / "certs").exists()


def test_secure_aggregation_in_process_is_refused_before_the_data_are_prepared(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("trip.experiment.prepare", lambda cfg: pytest.fail("prepared the data first"))
    _refused(capsys, ["run", str(DEMO), "--out", str(tmp_path / "run"), "--set", "federation.secure_aggregation=true"],
             "needs a Flower engine")
    assert not (tmp_path / "run").exists()


def test_a_missing_data_root_for_the_synthetic_set_is_refused_not_made(tmp_path, capsys):
    missing = tmp_path / "no" / "such"
    _refused(capsys, ["run", str(DEMO), "--data-root", str(missing), "--out", str(tmp_path / "run")],
             f"data root {missing} does not exist")
    assert not (tmp_path / "no").exists()


def test_certs_refuse_a_symbolic_link_in_their_folder(tmp_path, capsys):
    folder, outside = tmp_path / "certs", tmp_path / "outside.key"
    folder.mkdir()
    (folder / "ca.key").symlink_to(outside)  # dangling: `exists()` is False
    _refused(capsys, ["flower", "certs", str(folder)], "symbolic links ca.key")
    _refused(capsys, ["flower", "certs", str(folder), "--force"], "symbolic links ca.key")
    assert not outside.exists() and [p.name for p in folder.iterdir()] == ["ca.key"]
