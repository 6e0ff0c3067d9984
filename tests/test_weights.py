"""Weights files: OpenAI's formats (a TorchScript archive, a `torch.save`d state dict with its metadata entries)
reach `trip run` bit-identical through `trip weights convert` or directly; unreadable or foreign files and
unreachable downloads end in one message."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from open_clip.model import convert_weights_to_fp16
from safetensors.torch import save_file

from trip import weights
from trip.backbone import cache_dir, load_backbone, new_tiny_clip
from trip.cli import main
from trip.config import BackboneCfg
from trip.errors import TripError

CPU = torch.device("cpu")
METADATA = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77), "vocab_size": torch.tensor(49408)}


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _as_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """A scripted module whose state dict is `state`, as OpenAI's archives are (what load_openai_model reads)."""
    holder = _Holder()
    for name, value in state.items():
        *parents, leaf = name.split(".")
        module = holder
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, torch.nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    torch.jit.script(holder).save(str(path))


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path, Path]:
    """A tiny CLIP in OpenAI's layout and dtypes (fp16 where OpenAI has it; heads = width // 64 on rebuilding),
    other weights than trip's random tiny CLIP: as a TorchScript archive and as a torch.save'd state dict."""
    folder = tmp_path_factory.mktemp("openai")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = new_tiny_clip()
        for p in model.parameters():
            p.data.normal_()
    convert_weights_to_fp16(model)
    state = {**model.state_dict(), **METADATA}
    _as_torchscript(state, folder / "ViT-tiny.pt")
    torch.save(state, folder / "state_dict.pt")
    return model.state_dict(), folder / "ViT-tiny.pt", folder / "state_dict.pt"


def _equal_to(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return own.keys() == state.keys() and all(torch.equal(own[k], state[k].float()) for k in state)


def test_convert_then_run_loads_the_archives_weights_bit_identical(openai_files, tmp_path, capsys):
    state, archive, _ = openai_files
    out = tmp_path / "ViT-tiny.safetensors"
    assert main(["weights", "convert", str(archive), str(out)]) == 0
    printed = capsys.readouterr().out
    assert "trusted source" in printed
    assert f"SHA-256 {hashlib.sha256(archive.read_bytes()).hexdigest()}" in printed
    assert "matches none of OpenAI's published CLIP files" in printed
    assert _equal_to(load_backbone(BackboneCfg(name="tiny", pretrained=str(out)), CPU).model, state)


def test_openais_state_dict_with_its_metadata_entries_loads_directly(openai_files):
    state, _, saved = openai_files
    assert set(METADATA) <= set(torch.load(saved, weights_only=True))
    assert _equal_to(load_backbone(BackboneCfg(name="tiny", pretrained=str(saved)), CPU).model, state)


def test_the_hash_is_checked_against_open_clips_openai_urls(openai_files, tmp_path, monkeypatch, capsys):
    table = weights.official_openai_files()
    vit_b16 = open_clip.get_pretrained_url("ViT-B-16", "openai")
    assert table[vit_b16.split("/")[-2]] == vit_b16 and len(table) >= 9
    _, archive, _ = openai_files
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "official_openai_files", lambda: {digest: "https://openaipublic/x/ViT-tiny.pt"})
    weights.convert_openai(archive, tmp_path / "w.safetensors")
    assert "matches OpenAI's published file https://openaipublic/x/ViT-tiny.pt" in capsys.readouterr().out


def test_run_refuses_the_archive_itself_and_names_the_convert_command(openai_files):
    _, archive, _ = openai_files
    with pytest.raises(TripError, match=f"{archive} is a TorchScript archive.*trip weights convert"):
        load_backbone(BackboneCfg(name="tiny", pretrained=str(archive)), CPU)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_that_would_run_code_is_refused_unrun(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "evil.pt"
    torch.save({"visual.proj": _RunsCode(marker)}, path)
    with pytest.raises(TripError, match="evil.pt is not a weights file trip can read"):
        load_backbone(BackboneCfg(name="tiny", pretrained=str(path)), CPU)
    assert not marker.exists()


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> str:
    """A small named open_clip model (registered config), so a named backbone loads in a test."""
    folder = tmp_path_factory.mktemp("cfg")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "test-weights-micro.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return "test-weights-micro"


def _garbage(folder: Path) -> dict[str, Path]:
    files = {"random bytes": folder / "random.pt", "text": folder / "notes.bin",
             "another model": folder / "other.safetensors", "bad safetensors": folder / "cut.safetensors"}
    files["random bytes"].write_bytes(os.urandom(4096))
    files["text"].write_text("these are not weights\n")
    save_file({"linear.weight": torch.ones(3, 3)}, files["another model"])
    files["bad safetensors"].write_bytes(files["another model"].read_bytes()[:40])
    return files


@pytest.mark.parametrize("name", ["tiny", "micro"])
def test_garbage_weights_files_end_in_one_message_naming_the_file_and_the_fix(name, micro, tmp_path):
    model = micro if name == "micro" else "tiny"
    for kind, path in _garbage(tmp_path).items():
        with pytest.raises(TripError) as err:
            load_backbone(BackboneCfg(name=model, pretrained=str(path)), CPU)
        message = str(err.value)
        assert str(path) in message and "backbone.pretrained" in message and "\n" not in message, kind
    micro_file = tmp_path / "micro.safetensors"
    save_file(open_clip.create_model(micro).state_dict(), micro_file)
    with pytest.raises(TripError, match=r"does not hold tiny weights: .* of another shape \(e.g. "):
        load_backbone(BackboneCfg(name="tiny", pretrained=str(micro_file)), CPU)


def test_trip_run_with_a_garbage_weights_file_exits_2_without_traceback(tmp_path, capfd):
    (tmp_path / "w.pt").write_bytes(os.urandom(1000))
    config = tmp_path / "exp.yaml"
    backbone = {"name": "tiny", "pretrained": str(tmp_path / "w.pt")}
    config.write_text(yaml.safe_dump({"device": "cpu", "backbone": backbone, "methods": [{"name": "zeroshot"}],
                                      "data": {"name": "synthetic", "images_per_class": 2}}))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capfd.readouterr().err
    assert f"error: {tmp_path / 'w.pt'} is not a weights file" in err and "Traceback" not in err


def _unreachable(*args, **kwargs):
    raise OSError("[Errno -2] Name or service not known")


def test_an_uncached_tag_offline_fails_at_once(monkeypatch):
    monkeypatch.setattr(socket, "create_connection", _unreachable)
    start = time.monotonic()
    with pytest.raises(TripError, match="ViT-B-16 weights are not in the cache .* cannot be reached .*`trip weights "
                                        "convert"):
        load_backbone(BackboneCfg(name="ViT-B-16", pretrained="openai"), CPU)
    assert time.monotonic() - start < 5


def test_a_cached_tag_loads_from_the_cache_without_network(micro, monkeypatch):
    """open_clip's hub layout in trip's weights cache: the tag's file is found there and no socket is opened."""
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, micro, {"openai": {"hf_hub": "org/micro/", "url": ""}})
    monkeypatch.setattr(socket, "create_connection", _unreachable)
    repo = cache_dir() / "weights" / "models--org--micro"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        source = open_clip.create_model(micro)
    save_file(source.state_dict(), repo / "snapshots" / "abc123" / "open_clip_model.safetensors")
    loaded = load_backbone(BackboneCfg(name=micro, pretrained="openai"), CPU)
    assert _equal_to(loaded.model, source.state_dict()) and loaded.identity == f"{micro}:openai"


def test_convert_checks_the_output_before_loading_and_keeps_an_existing_file_unless_forced(
        openai_files, tmp_path, capsys, monkeypatch):
    _, archive, _ = openai_files
    out = tmp_path / "w.safetensors"
    out.write_bytes(b"mine")
    assert main(["weights", "convert", str(archive), str(out)]) == 2
    assert f"{out} already exists" in capsys.readouterr().err and out.read_bytes() == b"mine"
    assert main(["weights", "convert", str(archive), str(out), "--force"]) == 0
    assert out.read_bytes() != b"mine"
    monkeypatch.setattr(open_clip, "load_openai_model", lambda *a, **k: pytest.fail("loaded before the checks"))
    monkeypatch.setattr(weights.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    assert main(["weights", "convert", str(archive), str(tmp_path / "full.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {tmp_path / 'full.safetensors'}" in err and "MB free there" in err
    assert not (tmp_path / "full.safetensors").exists()
    read_only = tmp_path / "ro"
    read_only.mkdir(mode=0o555)  # root writes there anyway: a read-only tmpfs stops it
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs",
                                                    str(read_only)], capture_output=True).returncode == 0
    try:
        if os.geteuid() == 0 and not mounted:
            pytest.skip("root without mount: no folder it cannot write")
        assert main(["weights", "convert", str(archive), str(read_only / "w.safetensors")]) == 2
        assert "cannot write there (" in capsys.readouterr().err
    finally:
        if mounted:
            subprocess.run(["umount", str(read_only)], check=True)
