"""Backbone weights files: read a state dict without running code (safetensors, or a `torch.save`d dict loaded
with weights_only), load it into a model with one clear message when it does not fit, and convert OpenAI's
TorchScript archive (ViT-B-16.pt) to safetensors (`trip weights convert`), the one place an archive is opened."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
from open_clip.constants import HF_WEIGHTS_NAME
from open_clip.pretrained import _get_safe_alternatives, has_hf_hub
from safetensors.torch import load_file, save_file

from trip.errors import TripError, cannot_write
from trip.outputs import check_writable

# Entries of OpenAI's state dicts that are not weights; open_clip strips them only from TorchScript modules.
OPENAI_METADATA = ("input_resolution", "context_length", "vocab_size")
FP32_PER_SOURCE_BYTE = 2  # OpenAI's files hold fp16 weights; the converted file holds them in fp32
FIX = ("set backbone.pretrained to a CLIP weights file of backbone.name (OpenAI's ViT-B-16.pt converted with "
       "`trip weights convert`, or open_clip's open_clip_pytorch_model.bin; docs/reproduce.md)")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file or of a `torch.save`d state dict (optionally under 'state_dict', keys
    optionally prefixed 'module.'), without OpenAI's metadata entries. Never unpickles arbitrary objects."""
    if is_torchscript(path):
        raise TripError(f"{path} is a TorchScript archive (as OpenAI's ViT-B-16.pt), which runs code when loaded: "
                        f"convert it once with `trip weights convert {path} ViT-B-16-openai.safetensors` and set "
                        f"backbone.pretrained to the .safetensors file")
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zipfile and unpickling each raise their own kinds on a bad file
        what = (f"not a valid safetensors file: {_why(err)}" if path.suffix == ".safetensors" else
                f"neither a tensors-only state dict saved by torch.save nor safetensors: {type(err).__name__}")
        raise TripError(f"{path} is not a weights file trip can read ({what}); {FIX}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TripError(f"{path} holds no state dict of tensors ({type(state).__name__}): {FIX}")
    return {k.removeprefix("module."): v for k, v in state.items() if k not in OPENAI_METADATA}


def is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_weights(model: torch.nn.Module, path: Path, model_name: str) -> None:
    """Copies the file's tensors into `model` (strict); a file of another model is one TripError naming it."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {list(state[k].shape)} in the file, {list(own[k].shape)} in {model_name}"
                for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        found = [f"{len(missing)} tensors missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(reshaped)} of another shape (e.g. {reshaped[0]})" if reshaped else ""]
        raise TripError(f"{path} does not hold {model_name} weights: {', '.join(f for f in found if f)}. "
                        f"Set backbone.name to the model the file was saved from, or {FIX}")
    model.load_state_dict(state)


def cached_pretrained(name: str, tag: str, folder: Path) -> Path | None:
    """The file open_clip would load for (name, tag) if it is already in `folder`: the hub mirror's weights
    (safetensors first, as open_clip prefers them) or the file of the tag's URL."""
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        raise TripError(f"backbone.pretrained {tag!r} is neither a weights file nor an open_clip tag of {name}; "
                        f"known tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'}")
    repo, filename = os.path.split(pcfg.get("hf_hub", ""))
    if repo and has_hf_hub():
        from huggingface_hub import try_to_load_from_cache

        filename = filename or HF_WEIGHTS_NAME
        for candidate in (*_get_safe_alternatives(filename), filename):
            hit = try_to_load_from_cache(repo, candidate, cache_dir=str(folder))
            if isinstance(hit, str):
                return Path(hit)
    url = pcfg.get("url", "")
    if url and (folder / os.path.basename(url)).is_file():
        return folder / os.path.basename(url)
    return None


def download_host(name: str, tag: str) -> str:
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if pcfg.get("hf_hub") and has_hf_hub():
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(pcfg.get("url", "")).hostname or "huggingface.co"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def official_openai_files() -> dict[str, str]:
    """SHA-256 -> URL of OpenAI's CLIP files, from open_clip's pretrained table (the hash is the URL's
    second-to-last path part, which `clip.load` and open_clip check a download against)."""
    urls = (open_clip.get_pretrained_url(name, "openai") for name in open_clip.list_pretrained_models_by_tag("openai"))
    return {url.split("/")[-2]: url for url in urls if "openaipublic" in url}


def convert_openai(source: Path, out: Path, echo: Callable[[str], None] = print, force: bool = False) -> None:
    """OpenAI's CLIP file (a TorchScript archive, or its state dict) -> fp32 safetensors for backbone.pretrained.
    The output is checked before the source is loaded: an existing file is kept unless `force`, and a folder that
    cannot be written or lacks the space is refused; a write that fails anyway leaves nothing behind."""
    if not source.is_file():
        raise TripError(f"no file at {source}: give the path of OpenAI's ViT-B-16.pt")
    if out.suffix != ".safetensors":
        raise TripError(f"{out}: name the output file *.safetensors (trip reads a file's format from its suffix)")
    if out.exists() and not force:
        raise TripError(f"{out} already exists: choose another name, or pass --force to replace it")
    check_writable(out, "the output file", "ViT-B-16-openai.safetensors")
    need = FP32_PER_SOURCE_BYTE * source.stat().st_size
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise cannot_write(out, OSError(errno.ENOSPC, f"{free / 1e6:.0f} MB free there"), size=need)
    echo(f"note: {source.name} is opened with open_clip.load_openai_model; a TorchScript archive runs code when "
         f"loaded, so convert only files from a trusted source (OpenAI's URL below)")
    digest = sha256(source)
    echo(f"SHA-256 {digest}")
    url = official_openai_files().get(digest)
    echo(f"matches OpenAI's published file {url}" if url else
         f"matches none of OpenAI's published CLIP files (open_clip {open_clip.__version__}'s table): "
         f"make sure you trust where it came from")
    try:
        model = open_clip.load_openai_model(str(source), precision="fp32", device="cpu")
    except Exception as err:  # TorchScript, unpickling and open_clip's layout inference raise many kinds
        raise TripError(f"{source} is not an OpenAI CLIP file open_clip can load ({_why(err)}): get ViT-B-16.pt "
                        f"from the URL that open_clip.get_pretrained_url('ViT-B-16', 'openai') prints") from None
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"source_sha256": digest})
        os.replace(tmp, out)
    except OSError as err:
        raise cannot_write(out, err, size=need) from None
    finally:
        tmp.unlink(missing_ok=True)
    echo(f"wrote {out}: set backbone.pretrained to this file")


def _why(err: Exception) -> str:
    """The error's kind and first line: enough to tell a truncated file from a foreign one, on one line."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:160]}" if lines else type(err).__name__
