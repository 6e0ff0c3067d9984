"""Benchmarks, `trip data list/verify/download`, and the bad-image guard of a run. Everything runs on tiny
trees in tmp_path; the only network is a loopback HTTP server the tests start and stop."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
import zipfile
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from trip.cli import main
from trip.config import DataCfg, parse_config
from trip.data import benchmarks as bm
from trip.data import download as dl
from trip.data import loading
from trip.data.datasets import DATASETS, get_dataset
from trip.data.imagecheck import find_unreadable
from trip.data.loading import load_domains
from trip.errors import TripError

PER_CLASS = 2
BAD = ["sketch/dog/truncated.png", "art_painting/house/notes.jpg"]


def _png(path: Path, shade: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 80, 160)).save(path)


def _tree(root: Path, domains, classes, per_class: int = PER_CLASS) -> Path:
    for d in domains:
        for c in classes:
            for i in range(per_class):
                _png(root / d / c / f"{i}.png", 40 * i)
    return root


@pytest.fixture
def pacs(tmp_path) -> Path:
    """A data root holding PACS under DomainBed's folder name, with a truncated PNG and a text file named .jpg."""
    folder = _tree(tmp_path / "data" / "PACS", bm.PACS_DOMAINS, bm.PACS_CLASSES)
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, "PNG")
    (folder / BAD[0]).write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (folder / BAD[1]).write_text("not an image")
    return tmp_path / "data"


def _cfg(root: Path, **data) -> object:
    return parse_config({"device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
                         "data": {"name": "pacs", "root": str(root), **data}, "methods": [{"name": "zeroshot"}]})


# --- the registry --------------------------------------------------------------------------------------

@pytest.mark.parametrize("classes, n", [(bm.OFFICE_HOME_CLASSES, 65), (bm.DOMAINNET_CLASSES, 345),
                                        (bm.PACS_CLASSES, 7), (bm.VLCS_CLASSES, 5)])
def test_class_lists_are_unique_and_in_folder_order(classes, n):
    assert len(classes) == len(set(classes)) == n
    assert list(classes) == sorted(classes)  # case-sensitive, as ImageFolder sorts: 'TV' before 'Table'


def test_registry_matches_the_spec():
    assert get_dataset("office-home").classes.index("TV") + 1 == get_dataset("office-home").classes.index("Table")
    assert get_dataset("domain_net").classes[:3] == ("The_Eiffel_Tower", "The_Great_Wall_of_China", "The_Mona_Lisa")
    for name, domains, total in [("pacs", bm.PACS_DOMAINS, 9991), ("vlcs", bm.VLCS_DOMAINS, 10729),
                                 ("office-home", bm.OFFICE_HOME_DOMAINS, 15588),
                                 ("domain_net", bm.DOMAINNET_DOMAINS, 586575)]:
        spec = get_dataset(name)
        assert spec.domains == domains and sum(spec.expected_counts.values()) == total
        for domain, per_class in spec.class_counts.items():
            assert tuple(per_class) == spec.classes and sum(per_class.values()) == spec.expected_counts[domain]


def test_data_list_names_every_data_set(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("pacs", "vlcs", "office-home", "domain_net", "586,575", "PACS.zip"))


# --- verify --------------------------------------------------------------------------------------------

def test_verify_reports_counts_and_names_corrupt_files(pacs, capsys):
    assert main(["data", "verify", "pacs", "--root", str(pacs)]) == 1
    out = capsys.readouterr().out
    assert re.search(r"art_painting\s+15\s+2,048\s+1", out) and re.search(r"photo\s+14\s+1,670\s+0", out)
    assert all(f"unreadable: {bad}" in out for bad in BAD)
    assert "art_painting/dog: 2 images, expected 379" in out


def test_verify_passes_a_complete_copy(tmp_path, capsys, monkeypatch):
    _tree(tmp_path / "pacs", bm.PACS_DOMAINS, bm.PACS_CLASSES, per_class=1)
    tiny = replace(get_dataset("pacs"), expected_counts=dict.fromkeys(bm.PACS_DOMAINS, 7), class_counts={})
    monkeypatch.setitem(DATASETS, "pacs", tiny)
    assert main(["data", "verify", "pacs", "--root", str(tmp_path)]) == 0
    assert "OK" in capsys.readouterr().out


def test_a_missing_office_home_class_is_named(tmp_path, capsys):
    _tree(tmp_path / "office_home", ["Art"], [c for c in bm.OFFICE_HOME_CLASSES if c != "TV"], per_class=1)
    with pytest.raises(TripError, match=r"missing \['TV'\]"):
        load_domains(get_dataset("office-home"), tmp_path / "office_home", DataCfg(name="office-home"))
    assert main(["data", "verify", "office-home", "--root", str(tmp_path)]) == 1
    assert "Art: class folders missing: TV" in capsys.readouterr().out


# --- the guard before a run ----------------------------------------------------------------------------

def test_a_run_refuses_to_start_on_bad_images(pacs):
    from trip.experiment import prepare

    with pytest.raises(TripError, match="the run did not start") as err:
        prepare(_cfg(pacs))
    assert all(bad in str(err.value) for bad in BAD) and "data.skip_bad_images: true" in str(err.value)


def test_skipping_bad_images_runs_and_records_them(pacs, tmp_path, monkeypatch):
    from trip.experiment import prepare, run_experiment

    cfg = _cfg(pacs, skip_bad_images=True, targets=["photo"])
    run_experiment(cfg, tmp_path / "run")
    doc = json.loads((tmp_path / "run" / "results.json").read_text())
    assert doc["skipped_images"] == {"art_painting": 1, "cartoon": 0, "photo": 0, "sketch": 1}
    assert len(doc["runs"]) == 1

    def reopen_all(*args, **kwargs):
        raise AssertionError("the decode check should come from the cache")

    monkeypatch.setattr(loading, "find_unreadable", reopen_all)
    ws = prepare(cfg)
    assert ws.skipped_images["sketch"] == 1 and len(ws.domains["sketch"]) == 7 * PER_CLASS
    assert not any(bad in ws.domains[d].paths for d in ws.domains for bad in BAD)


@pytest.mark.slow
def test_with_the_bad_files_gone_the_paper_config_runs_to_its_table(pacs, tmp_path, capsys):
    for bad in BAD:
        (pacs / "PACS" / bad).unlink()
    config = Path(__file__).parents[1] / "configs" / "pacs" / "trip-lite.yaml"
    out = tmp_path / "run"
    assert main(["run", str(config), "--data-root", str(pacs), "--backbone", "tiny", "--set", "train.rounds=1",
                 "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["target"] for r in runs) == sorted(bm.PACS_DOMAINS)
    assert all(0 <= r["acc"] <= 100 for r in runs)
    table = capsys.readouterr().out
    assert "trip-lite" in table and all(d in table for d in bm.PACS_DOMAINS)


def test_the_parallel_check_finds_the_one_bad_file(tmp_path):
    _tree(tmp_path, ["d"], [f"c{i}" for i in range(30)], per_class=10)
    (tmp_path / "d" / "c7" / "3.png").write_bytes(b"\x89PNG\r\n")
    paths = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.png"))
    assert list(find_unreadable(tmp_path, paths)) == ["d/c7/3.png"]


def test_domain_aliases_and_class_list_from_folders(tmp_path):
    names = ("Art", "Clipart", "Product", "Real World")
    _tree(tmp_path / "OfficeHomeDataset_10072016", names, ("Bike", "Mug"), per_class=1)
    spec = get_dataset("office-home")
    data = load_domains(spec, tmp_path / "OfficeHomeDataset_10072016", DataCfg(name="office-home",
                                                                                 class_list="folders"))
    assert data.spec.classes == ("Bike", "Mug") and list(data.domains) == list(spec.domains)
    assert data.domains["Real_World"].paths == ["Real World/Bike/0.png", "Real World/Mug/0.png"]


def test_domainnet_official_splits_restrict_each_domain(tmp_path):
    root = tmp_path / "domain_net"
    for d in bm.DOMAINNET_DOMAINS:
        for c in bm.DOMAINNET_CLASSES:
            (root / d / c).mkdir(parents=True)
        for i in range(3):
            _png(root / d / "zebra" / f"{d}_{i}.png", 40 * i)
        (root / f"{d}_train.txt").write_text(f"{d}/zebra/{d}_0.png 344\n")
        (root / f"{d}_test.txt").write_text(f"{d}/zebra/{d}_2.png 344\n")
    spec = get_dataset("domain_net")
    assert len(load_domains(spec, root, DataCfg(name="domain_net")).domains["real"]) == 3
    data = load_domains(spec, root, DataCfg(name="domain_net", domainnet_splits="official"))
    assert data.domains["real"].paths == ["real/zebra/real_0.png", "real/zebra/real_2.png"]
    assert list(data.domains["real"].labels) == [spec.classes.index("zebra")] * 2
    (root / "real_test.txt").write_text("real/zebra/gone.png 344\n")
    with pytest.raises(TripError, match="real/zebra/gone.png"):
        load_domains(spec, root, DataCfg(name="domain_net", domainnet_splits="official"))
    with pytest.raises(TripError, match="domain_net only"):
        load_domains(get_dataset("pacs"), root, DataCfg(name="pacs", domainnet_splits="official"))


# --- download ------------------------------------------------------------------------------------------

class _Files(BaseHTTPRequestHandler):
    """Serves `files` with HTTP Range support; with `cut_first`, the first full response stops halfway."""

    files: dict[str, bytes] = {}
    ranges: list[str | None] = []
    cut_first = False

    def do_GET(self) -> None:
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        asked = self.headers.get("Range")
        type(self).ranges.append(asked)
        start = int(re.fullmatch(r"bytes=(\d+)-", asked).group(1)) if asked else 0
        body = data[start:]
        self.send_response(206 if asked else 200)
        if asked:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if type(self).cut_first:
            type(self).cut_first = False
            body = body[: len(body) // 2]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    handler = type("Handler", (_Files,), {"files": {}, "ranges": [], "cut_first": False})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _pacs_zip(tmp_path: Path) -> bytes:
    """PACS wrapped in an extra folder, with macOS debris, as archives often come."""
    src = _tree(tmp_path / "src", bm.PACS_DOMAINS, bm.PACS_CLASSES, per_class=1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path in sorted(src.rglob("*.png")):
            z.write(path, f"kfold/{path.relative_to(src)}")
        z.writestr("__MACOSX/kfold/._photo", "")
    return buf.getvalue()


def test_download_resumes_checks_and_extracts(tmp_path, server, monkeypatch, capsys):
    handler, base = server
    archive = _pacs_zip(tmp_path)
    handler.files["/PACS.zip"] = archive
    handler.cut_first = True
    monkeypatch.setenv("TRIP_DATA_MIRROR", base)
    root = tmp_path / "data"
    assert main(["data", "download", "pacs", "--root", str(root)]) == 2
    assert "run the same command again" in capsys.readouterr().err
    assert main(["data", "download", "pacs", "--root", str(root)]) == 0
    assert handler.ranges[0] is None and re.fullmatch(r"bytes=\d+-", handler.ranges[1])
    assert hashlib.sha256(archive).hexdigest() in capsys.readouterr().out
    assert sorted(p.name for p in (root / "pacs").iterdir()) == sorted(bm.PACS_DOMAINS)
    assert (root / "pacs" / "sketch" / "person" / "0.png").is_file()
    assert not any((root / dl.DOWNLOADS).iterdir())  # archive removed after extraction
    assert main(["data", "verify", "pacs", "--root", str(root)]) == 1  # 1 image per class, not the real counts
    assert "unreadable:" not in capsys.readouterr().out


def test_download_rejects_a_bad_checksum(tmp_path, server, capsys):
    handler, base = server
    handler.files["/PACS.zip"] = _pacs_zip(tmp_path)
    root = tmp_path / "data"
    code = main(["data", "download", "pacs", "--root", str(root), "--url", f"{base}/PACS.zip", "--sha256", "0" * 64])
    assert code == 2 and "does not match" in capsys.readouterr().err
    assert not (root / "pacs").exists() and not any((root / dl.DOWNLOADS).iterdir())


def test_download_offline_fails_at_once_with_the_manual_steps(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    start = time.perf_counter()
    code = main(["data", "download", "pacs", "--root", str(tmp_path), "--url", f"http://127.0.0.1:{port}/PACS.zip"])
    err = capsys.readouterr().err
    assert code == 2 and time.perf_counter() - start < dl.CONNECT_TIMEOUT
    assert "To install by hand" in err and str(tmp_path / dl.DOWNLOADS) in err


def test_install_renames_domain_aliases(tmp_path):
    src = _tree(tmp_path / "src", ("Art", "Clipart", "Product", "Real World"), ("Mug",), per_class=1)
    path = tmp_path / "OfficeHome.zip"
    with zipfile.ZipFile(path, "w") as z:
        for file in src.rglob("*.png"):
            z.write(file, f"OfficeHomeDataset_10072016/{file.relative_to(src)}")
    spec = get_dataset("office-home")
    dl.install(spec, path, spec.archives[0], tmp_path / "office-home")
    assert sorted(p.name for p in (tmp_path / "office-home").iterdir()) == sorted(bm.OFFICE_HOME_DOMAINS)
