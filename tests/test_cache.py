"""Caches that cannot lie: frozen features keyed by the images on disk; every cache file checksummed, and a bad
one rebuilt with a warning (never used, never fatal); concurrent writers never mix a shared entry."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from patience import PATIENCE_S

from trip import pretrain, safefile
from trip.data.folder import scan_domain
from trip.data.loading import cached_unreadable
from trip.data.synthetic import CLASSES, DOMAINS, write_domains
from trip.features import FrozenStore, Inputs, RoutingSpec

SPECS = [RoutingSpec(4, 1.0, iters=20, run="train"), RoutingSpec(4, 2.0, iters=20, run="infer")]
INPUTS = Inputs(cls=True, routing=tuple(SPECS))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_domains(tmp_path_factory.mktemp("data"), images_per_class=2, seed=0)


@pytest.fixture(scope="module")
def clean(data, tiny_backbone, tmp_path_factory):
    """The photo domain's features from an empty cache: what every rebuilt file must equal."""
    store = FrozenStore(tiny_backbone, tmp_path_factory.mktemp("clean-cache"))
    return store.load("synthetic", scan_domain(data, "photo", CLASSES), INPUTS)


def _store(tiny_backbone, tmp_path: Path, data: Path):
    store = FrozenStore(tiny_backbone, tmp_path / "cache")
    domain = scan_domain(data, "photo", CLASSES)
    store.load("synthetic", domain, INPUTS)
    (path,) = (tmp_path / "cache").rglob("*.safetensors")
    return store, domain, path


def _equal(a, b) -> bool:
    same_routing = all(torch.equal(a.routing[k], b.routing[k]) for k in a.routing)
    return (torch.equal(a.features, b.features) and torch.equal(a.cls, b.cls)
            and a.routing.keys() == b.routing.keys() and same_routing)


def _tensor_offset(path: Path, name: str) -> int:
    """Where a tensor's bytes start in a safetensors file."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    return 8 + header_len + header[name]["data_offsets"][0]


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x40
    path.write_bytes(bytes(raw))


def test_overwritten_images_give_new_features_not_the_cached_ones(tiny_backbone, tmp_path, capsys):
    data = write_domains(tmp_path / "data", images_per_class=2, seed=0)
    store, domain, _ = _store(tiny_backbone, tmp_path, data)
    before = store.load("synthetic", domain, INPUTS)
    for p in domain.paths:  # the sketch images under the photo names
        shutil.copyfile(data / p.replace("photo", "sketch"), data / p)
    capsys.readouterr()
    after = store.load("synthetic", domain, INPUTS)
    assert "images of photo changed on disk" in capsys.readouterr().err
    assert not torch.equal(after.features, before.features)
    fresh = FrozenStore(tiny_backbone, tmp_path / "fresh").load("synthetic", domain, INPUTS)
    assert _equal(after, fresh)
    capsys.readouterr()
    store.load("synthetic", domain, INPUTS)
    assert capsys.readouterr().err == ""  # the rebuilt file is used as is: no note, no computation


@pytest.mark.parametrize("damage", ["flip-features", "flip-routing", "truncate", "other-domain", "wrong-rows"])
def test_a_bad_feature_file_is_rebuilt_with_a_warning(damage, data, clean, tiny_backbone, tmp_path, capsys):
    store, domain, path = _store(tiny_backbone, tmp_path, data)
    if damage == "flip-features":
        _flip(path, _tensor_offset(path, "features") + 5)
    elif damage == "flip-routing":
        _flip(path, _tensor_offset(path, SPECS[1].key()) + 9)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "other-domain":
        FrozenStore(tiny_backbone, tmp_path / "other").load("synthetic", scan_domain(data, "sketch", CLASSES), INPUTS)
        shutil.copyfile(next((tmp_path / "other").rglob("*.safetensors")), path)
    else:  # a whole, checksummed file for these images, but with a row missing
        tensors, meta = safefile.read_tensors(path)
        safefile.write_tensors(path, {k: v[:-1] for k, v in tensors.items()}, meta)
    capsys.readouterr()
    got = store.load("synthetic", domain, INPUTS)
    err = capsys.readouterr().err
    assert f"warning: frozen-feature cache {path} is corrupt" in err and "rebuilding" in err
    assert _equal(got, clean)
    assert _equal(FrozenStore(tiny_backbone, tmp_path / "cache").load("synthetic", domain, INPUTS), clean)
    assert capsys.readouterr().err == ""


TINY_RECIPE = {**pretrain.RECIPE, "images": 48, "steps": 2, "groups": 2}


@pytest.mark.parametrize("damage", ["truncate", "flip", "wrong-keys"])
def test_a_bad_tiny_clip_file_is_pretrained_again(damage, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRIP_CACHE", str(tmp_path))
    monkeypatch.setattr(pretrain, "RECIPE", TINY_RECIPE)
    model, identity = pretrain.pretrained_tiny_clip()
    (path,) = tmp_path.glob("tiny-clip-synthetic-*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "flip":
        _flip(path, _tensor_offset(path, "visual.proj") + 3)
    else:
        safefile.write_tensors(path, {"visual.proj": torch.zeros(2, 2)})
    capsys.readouterr()
    again, identity_again = pretrain.pretrained_tiny_clip()
    assert f"warning: pretrained tiny CLIP {path} is corrupt" in capsys.readouterr().err
    assert identity_again == identity
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    pretrain.pretrained_tiny_clip()
    assert capsys.readouterr().err == ""


def test_a_bad_image_check_file_is_checked_again(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRIP_CACHE", str(tmp_path))
    domain = scan_domain(data, "cartoon", CLASSES)
    assert cached_unreadable("synthetic", data, domain) == {}
    (path,) = (tmp_path / "imagecheck").rglob("*.json")
    path.write_text(path.read_text().replace('"bad": {}', '"bad": {"x.png": "made up"}'))
    capsys.readouterr()
    assert cached_unreadable("synthetic", data, domain) == {}
    assert f"warning: image-check cache {path} is corrupt (checksum mismatch)" in capsys.readouterr().err
    assert cached_unreadable("synthetic", data, domain) == {}
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_concurrent_synthetic_sets_with_other_settings_are_both_right(tmp_path):
    """Four processes at once into one root: two settings, each twice (so each setting also has a race)."""
    script = ("import sys; from pathlib import Path; from trip.data.synthetic import write_domains; "
              "print(write_domains(Path(sys.argv[1]), images_per_class=int(sys.argv[2]), seed=0))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "shared"), str(n)], env=env,
                              stdout=subprocess.PIPE, text=True) for n in (2, 3, 2, 3)]
    outs = [p.communicate(timeout=PATIENCE_S)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0]
    assert outs[0] == outs[2] and outs[1] == outs[3] and outs[0] != outs[1]
    for out, n in zip(outs[:2], (2, 3), strict=True):
        alone = write_domains(tmp_path / f"alone{n}", images_per_class=n, seed=0)
        files = sorted(p.relative_to(out) for p in Path(out).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(alone) for p in alone.rglob("*") if p.is_file())
        assert len(files) == len(DOMAINS) * len(CLASSES) * n + 2  # + manifest.json, images.txt
        assert all((Path(out) / f).read_bytes() == (alone / f).read_bytes() for f in files)
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == sorted({Path(o).name for o in outs})


@pytest.mark.slow
def test_concurrent_writers_of_one_file_never_leave_a_mixed_one(tmp_path):
    script = ("import sys, torch; from pathlib import Path; from trip import safefile\n"
              "v = float(sys.argv[2])\n"
              "for _ in range(30): safefile.write_tensors(Path(sys.argv[1]), {'x': torch.full((50_000,), v)})")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    path = tmp_path / "entry.safetensors"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), str(v)], env=env) for v in (1, 2)]
    seen = set()
    while any(p.poll() is None for p in procs):
        if path.exists():
            tensors, _ = safefile.read_tensors(path)  # BadFile would fail the test
            seen.add(tuple(tensors["x"].unique().tolist()))
    assert [p.returncode for p in procs] == [0, 0]
    assert seen <= {(1.0,), (2.0,)} and list(tmp_path.iterdir()) == [path]


def test_train_and_infer_routing_are_separate_cache_entries_even_at_one_capacity():
    assert RoutingSpec(4, 1.0, run="train").key() != RoutingSpec(4, 1.0, run="infer").key()


def test_patch_tokens_are_read_per_batch_and_a_bad_chunk_is_rebuilt(data, tiny_backbone, tmp_path, monkeypatch,
                                                                     capsys):
    from trip import patchcache
    from trip.backbone import load_image

    monkeypatch.setattr(patchcache, "CHUNK_BYTES", 3 * 64 * 64 * 2)  # 3 images per chunk
    domain = scan_domain(data, "photo", CLASSES)
    store = FrozenStore(tiny_backbone, tmp_path / "cache")
    patches = store.load("synthetic", domain, Inputs(patches=True)).patches
    pixels = torch.stack([tiny_backbone.transform()(load_image(data / p)) for p in domain.paths[4:6]])
    want = tiny_backbone.project_patches(tiny_backbone.encode_images(pixels)[1]).half().float()
    assert torch.equal(patches.rows(torch.tensor([4, 5])), want) and len(patches.chunks) > 2
    path = next((tmp_path / "cache").rglob("*.patches"))
    _flip(path, 4 * 64 * 64 * 2 + 7)  # in image 4, chunk 1, not yet read by a fresh process
    capsys.readouterr()
    fresh = store.load("synthetic", domain, Inputs(patches=True)).patches
    assert capsys.readouterr().err == ""  # the chunk is checked on its first read, not at open
    assert torch.equal(fresh.rows(torch.tensor([0])), patches.rows(torch.tensor([0])))  # chunk 0 is fine
    assert torch.equal(fresh.rows(torch.tensor([5, 4])), want.flip(0))
    assert f"warning: patch-token cache {path} is corrupt (chunk 1" in capsys.readouterr().err


def test_a_deleted_or_added_image_of_the_synthetic_set_gets_it_drawn_again(tmp_path, capsys):
    """Used as it was, the set scored a held-out domain on 71 images instead of 72 (issue 22)."""
    folder = write_domains(tmp_path, images_per_class=2, seed=0)
    image = folder / "photo" / "circle" / "photo_circle_0001.png"
    drawn = image.read_bytes()
    image.unlink()
    (folder / "sketch" / "star" / "extra.png").write_bytes(drawn)
    assert write_domains(tmp_path, images_per_class=2, seed=0) == folder
    assert "differs from the images drawn into it" in capsys.readouterr().err
    assert image.read_bytes() == drawn and not (folder / "sketch" / "star" / "extra.png").exists()
    assert all(len(scan_domain(folder, d, CLASSES)) == 2 * len(CLASSES) for d in DOMAINS)


def _mount(*args: str) -> None:
    if os.geteuid() != 0 or subprocess.run(["mount", *args], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount (a real full or read-only file system)")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 kB tmpfs: a real ENOSPC without filling a disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk))
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_while_drawing_the_synthetic_set_is_one_message_and_leaves_nothing(small_disk, capsys):
    from trip.errors import TripError

    with pytest.raises(TripError) as err:
        write_domains(small_disk, images_per_class=20, seed=0)
    message = str(err.value)
    assert message.startswith(f"cannot write the synthetic data set {small_disk}/synthetic-") and \
        "No space left on device" in message and "MB free there" in message
    assert list(small_disk.iterdir()) == []


def test_a_full_disk_keeps_a_run_file_as_it_was(small_disk):
    from trip.errors import TripError

    (small_disk / "clients.json").write_text("old")
    with pytest.raises(TripError, match=f"cannot write {small_disk / 'clients.json'}: No space left on device; "
                                        f"it needs 0.1 MB free there"):
        safefile.write_text(small_disk / "clients.json", "x" * 100_000)
    assert [p.name for p in small_disk.iterdir()] == ["clients.json"]
    assert (small_disk / "clients.json").read_text() == "old"


def test_a_read_only_complete_cache_is_used_and_never_written(tmp_path, monkeypatch, capsys):
    """A shared cluster's cache, filled once and mounted read-only (here under another path, so that the image
    check, keyed by the data's real path, misses): the run uses it and notes what it could not store."""
    from trip.cli import main

    cfg = {"name": "ro", "seeds": [0], "device": "cpu", "backbone": {"name": "tiny", "pretrained": None},
           "data": {"name": "synthetic", "images_per_class": 2, "targets": ["sketch"]},
           "train": {"rounds": 1, "batch_size": 8}, "methods": [{"name": "zeroshot"}]}
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    filled, shared = tmp_path / "filled", tmp_path / "shared"
    monkeypatch.setenv("TRIP_CACHE", str(filled))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "a")]) == 0
    shared.mkdir()
    _mount("--bind", str(filled), str(shared))
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(shared)], check=True)
        monkeypatch.setenv("TRIP_CACHE", str(shared))
        capsys.readouterr()
        assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "b")]) == 0
        err = capsys.readouterr().err
        assert "the image check was not stored" in err and "Read-only file system" in err
        assert json.loads((tmp_path / "b" / "results.json").read_text())["runs"][0]["acc"] == \
            json.loads((tmp_path / "a" / "results.json").read_text())["runs"][0]["acc"]
    finally:
        subprocess.run(["umount", str(shared)], check=True)


def test_patch_tokens_that_a_full_cache_cannot_take_are_one_message(data, tiny_backbone, small_disk):
    """They stream to disk (never whole in RAM), so they are the one cache a run cannot do without."""
    from trip.errors import TripError

    store = FrozenStore(tiny_backbone, small_disk)
    with pytest.raises(TripError, match=r"cannot write the patch-token cache .*photo-.*\.patches: No space left"):
        store.load("synthetic", scan_domain(data, "photo", CLASSES), Inputs(patches=True))
    assert not [p for p in small_disk.rglob("*") if p.is_file()]
