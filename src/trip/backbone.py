"""Frozen CLIP backbones from open_clip: loading (named, local file, tiny), preprocessing, and the
image path TRIP needs (image features plus the final-block tokens before `ln_post`)."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from PIL import Image
from torchvision import transforms

from trip.config import BackboneCfg, names_a_weights_file
from trip.data.synthetic import DOMAINS
from trip.errors import TripError
from trip.paths import cache_dir
from trip.pretrain import pretrained_tiny_clip
from trip.tinyclip import CLIP_MEAN, CLIP_STD, new_tiny_clip
from trip.weights import cached_pretrained, download_host, load_weights


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TripError("device 'cuda' was asked for but no CUDA GPU is visible: set device: cpu or auto")
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast for the frozen encoders on GPU; plain fp32 on CPU (bit-reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Backbone:
    model: open_clip.model.CLIP
    tokenizer: open_clip.tokenizer.SimpleTokenizer
    identity: str  # names the weights exactly; part of every cache key
    device: torch.device

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, tuple) else size

    @property
    def text_width(self) -> int:
        return self.model.token_embedding.weight.shape[1]

    @property
    def vision_width(self) -> int:
        return self.model.visual.class_embedding.shape[0]

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def transform(self) -> transforms.Compose:
        """The CLIP test transform (docs/method.md §1.3), used for every split: no augmentation."""
        return clip_transform(self.image_size)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features [B, E] (unnormalised, as `encode_image`) and the final-block residual tokens
        [B, 1 + grid², Dv] (CLS first, before ln_post and the projection): the router's input."""
        visual = self.model.visual
        with autocast(self.device):
            tokens = visual.transformer(visual._embeds(pixels.to(self.device)))
            pooled, _ = visual._pool(tokens)
            if visual.proj is not None:
                pooled = pooled @ visual.proj
        return pooled.float(), tokens.float()

    @torch.no_grad()
    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, grid², E] patch tokens after ln_post and the projection (CLS dropped), from `encode_images`'
        residual tokens: the image side of FedOTP's transport."""
        visual = self.model.visual
        with autocast(self.device):
            patches = visual.ln_post(tokens[:, 1:])
            if visual.proj is not None:
                patches = patches @ visual.proj
        return patches.float()


def clip_transform(size: int) -> transforms.Compose:
    """open_clip's (and the official code's) test transform: resize the short side (bicubic) and centre-crop
    the image in its own mode, then convert to RGB, ToTensor, Normalize. Converting before the crop gives other
    pixels for P, RGBA, LA and CMYK images."""
    return open_clip.transform.image_transform(size, is_train=False, mean=CLIP_MEAN, std=CLIP_STD)


def load_image(path: Path) -> Image.Image:
    """The decoded image in its own mode: `clip_transform` converts it to RGB after the crop."""
    with Image.open(path) as image:
        image.load()
        return image


def load_backbone(cfg: BackboneCfg, device: torch.device) -> Backbone:
    if cfg.name == "tiny":
        model, identity = _tiny(cfg)
    else:
        model, identity = _named(cfg)
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return Backbone(model, tokenizer, identity, device)


def _tiny(cfg: BackboneCfg) -> tuple[open_clip.model.CLIP, str]:
    if cfg.pretrained is None:
        return new_tiny_clip(), "tiny:random"
    if cfg.pretrained == "synthetic":
        return pretrained_tiny_clip(tuple(cfg.pretrain_styles or DOMAINS))
    path = Path(cfg.pretrained).expanduser()
    if not path.is_file():
        raise TripError(f"backbone.pretrained: no weights file at {path}; see docs/reproduce.md")
    model = new_tiny_clip()
    load_weights(model, path, "tiny")
    return model, f"tiny:{_file_digest(path)}"


def _named(cfg: BackboneCfg) -> tuple[open_clip.model.CLIP, str]:
    if cfg.name not in open_clip.list_models():
        raise TripError(f"backbone.name {cfg.name!r} is not an open_clip model (nor 'tiny'); "
                        f"e.g. ViT-B-16, ViT-B-32, ViT-L-14")
    if cfg.pretrained is None:
        return _random(cfg.name, bool(cfg.quick_gelu)), f"{cfg.name}:random"
    local = Path(cfg.pretrained).expanduser()
    looks_like_path = names_a_weights_file(cfg.pretrained)
    quick = cfg.quick_gelu if cfg.quick_gelu is not None else (cfg.pretrained == "openai" or looks_like_path)
    if looks_like_path:
        if not local.is_file():
            raise TripError(f"backbone.pretrained: no weights file at {local}. " + _WEIGHTS_HELP)
        model = _random(cfg.name, quick)
        load_weights(model, local, cfg.name)
        return model, f"{cfg.name}:{_file_digest(local)}"
    return _tagged(cfg.name, cfg.pretrained, quick), f"{cfg.name}:{cfg.pretrained}"


def _random(name: str, quick_gelu: bool) -> open_clip.model.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu)


def _tagged(name: str, tag: str, quick_gelu: bool) -> open_clip.model.CLIP:
    """open_clip's weights for a pretrained tag: from the cache when they are there; else downloaded, unless the
    download host cannot be reached, which is said at once (huggingface_hub would retry for about a minute)."""
    cached = cached_pretrained(name, tag, cache_dir() / "weights")
    if cached is not None:
        model = _random(name, quick_gelu)
        load_weights(model, cached, name)
        return model
    host = download_host(name, tag)
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise TripError(f"backbone.pretrained {tag!r}: the {name} weights are not in the cache "
                        f"({cache_dir() / 'weights'}) and {host} cannot be reached ({err}). " + _WEIGHTS_HELP) from None
    try:
        return open_clip.create_model(name, pretrained=tag, force_quick_gelu=quick_gelu,
                                      cache_dir=str(cache_dir() / "weights"))
    except Exception as err:  # open_clip raises many kinds when a download fails
        raise TripError(f"could not load the {name} weights {tag!r} ({type(err).__name__}: "
                        f"{str(err)[:200]}). " + _WEIGHTS_HELP) from None


_WEIGHTS_HELP = (
    "On a machine with internet, get OpenAI's ViT-B-16.pt (the URL: python -c \"import open_clip; "
    "print(open_clip.get_pretrained_url('ViT-B-16', 'openai'))\"), copy it here, run `trip weights convert "
    "ViT-B-16.pt ViT-B-16-openai.safetensors`, and set backbone.pretrained to that file (docs/reproduce.md)."
)


def _file_digest(path: Path) -> str:
    """A cheap identity for a weights file: size and the hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read())
    return digest.hexdigest()[:16]
