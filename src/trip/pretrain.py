"""Contrastive pretraining of the tiny CLIP on the synthetic caption corpus, so the demo's backbone knows the
synthetic shapes as real CLIP knows real objects (docs/datasets.md, "The synthetic task"). On this recipe its
zero-shot is still as good as a linear probe on its features, so prompts have no room to learn (docs/studies.md).

The weights of the default recipe (every style in the corpus) ship with trip (`trip/assets/`), written by
`trip weights pretrain-tiny`; a corpus of other styles (`backbone.pretrain_styles`) is pretrained once on first use
and cached. Both are checksummed files (`trip.safefile`) holding every tensor but the unused rows of the token
embedding, which stay at the fixed random init (`trip.tinyclip`): pretraining never moves a row whose token it never
sees, so the file is small and the model exact."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from trip import safefile
from trip.build_lock import build_lock
from trip.data import synthetic
from trip.errors import TripError
from trip.paths import cache_dir
from trip.progress import progress
from trip.tinyclip import CLIP_MEAN, CLIP_STD, TINY_CFG, new_tiny_clip

RECIPE = {"version": 4, "images": 6000, "steps": 600, "groups": 16, "lr": 4e-3, "seed": 0, "label_weight": 1.0}
EMBEDDING = "token_embedding.weight"


def recipe_key(styles: tuple[str, ...] = synthetic.DOMAINS) -> str:
    """Names everything that decides the pretrained weights."""
    what = [TINY_CFG, RECIPE, synthetic.GENERATOR_VERSION, list(styles)]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def file_name(key: str) -> str:
    return f"tiny-clip-synthetic-{key}.safetensors"


def pretrained_tiny_clip(styles: tuple[str, ...] = synthetic.DOMAINS) -> tuple[open_clip.model.CLIP, str]:
    """The tiny CLIP pretrained on a corpus of `styles`, and its identity (recipe and weights)."""
    key = recipe_key(styles)
    shipped = resources.files("trip") / "assets" / file_name(key)  # there for the default recipe only
    if shipped.is_file():
        with resources.as_file(shipped) as path:
            model, digest = _load(path, key)
        if model is not None:
            return model, f"tiny:synthetic-{key}-{digest[:8]}"
    path = cache_dir() / file_name(key)
    with build_lock(path, "pretraining the tiny CLIP"):  # a second first run waits, then loads the file
        model, digest = _load(path, key) if path.is_file() else (None, "")
        if model is None:
            model = new_tiny_clip()
            pretrain(model, styles)
            tensors = compact(model)
            digest = safefile.digest(tensors)
            safefile.store_in_cache(lambda: write(path, tensors, styles), "pretrained tiny CLIP", path)
    return model, f"tiny:synthetic-{key}-{digest[:8]}"


def write_pretrained(folder: Path, styles: tuple[str, ...], force: bool = False) -> tuple[Path, str]:
    """`trip weights pretrain-tiny`: pretrains from scratch and writes the file into `folder`; (path, the file's
    SHA-256 as `sha256sum` prints it)."""
    path = Path(folder) / file_name(recipe_key(styles))
    if path.exists() and not force:
        raise TripError(f"{path} exists: pass --force to overwrite it")
    model = new_tiny_clip()
    pretrain(model, styles)
    write(path, compact(model), styles)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, tensors: dict[str, torch.Tensor], styles: tuple[str, ...]) -> None:
    """`tensors`: `compact(model)`."""
    safefile.write_tensors(path, tensors, {"recipe": recipe_key(styles), "styles": ",".join(styles)})


def compact(model: open_clip.model.CLIP) -> dict[str, torch.Tensor]:
    """Every tensor of the model but the token embedding's rows that differ from the init, kept apart."""
    state = model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k != EMBEDDING}
    rows = (state[EMBEDDING] != new_tiny_clip().state_dict()[EMBEDDING]).any(1).nonzero().squeeze(1)
    tensors["token_embedding.rows"] = rows
    tensors["token_embedding.values"] = state[EMBEDDING][rows].contiguous()
    return tensors


def _load(path: Path, key: str) -> tuple[open_clip.model.CLIP | None, str]:
    """(model, weights digest), or (None, "") with a warning when the file is damaged or of another recipe."""
    try:
        tensors, meta = safefile.read_tensors(path)
        if meta.get("recipe") != key:
            raise safefile.BadFile(f"written by recipe {meta.get('recipe')}, not {key}")
        model = new_tiny_clip()
        embedding = model.state_dict()[EMBEDDING].clone()
        embedding[tensors.pop("token_embedding.rows")] = tensors.pop("token_embedding.values")
        model.load_state_dict({**tensors, EMBEDDING: embedding})
    except (safefile.BadFile, RuntimeError, KeyError, IndexError) as err:  # RuntimeError: misshapen or missing keys
        safefile.warn_rebuild("pretrained tiny CLIP", path, str(err).splitlines()[0])
        return None, ""
    return model.eval().requires_grad_(False), meta["sha256"]


def pretrain(model: open_clip.model.CLIP, styles: tuple[str, ...] = synthetic.DOMAINS) -> None:
    """CLIP's contrastive loss inside groups of captions of one style and every class (plain in-batch contrast on
    so small a model learns colours and styles first and shapes barely; within a group only the shape tells the
    captions apart), plus cross-entropy of a linear head (discarded afterwards) on the image embedding over the
    corpus' shape labels: the image tower learns the shapes faster than text alone teaches them, as a large CLIP's
    image features hold more than its text aligns. The token embedding gets no weight decay, so rows of tokens the
    corpus never holds stay exactly at their init."""
    k = len(synthetic.CLASSES)
    images, captions, labels = synthetic.caption_corpus(RECIPE["images"], seed=RECIPE["seed"],
                                                        size=TINY_CFG["vision_cfg"]["image_size"], styles=styles)
    blocks = torch.from_numpy(labels).view(-1, k)  # the corpus cycles classes: one block = one style
    assert (blocks == torch.arange(k)).all(), "caption_corpus no longer cycles through the classes"
    pixels = _normalise(images)  # [n, 3, s, s]
    text = open_clip.get_tokenizer("ViT-B-16")(captions)  # [n, 77]
    text = text[:, : int(text.argmax(-1).max()) + 1]  # causal + EOT pooling: later positions never matter
    gen = torch.Generator().manual_seed(RECIPE["seed"])
    head = _label_head(model, k)
    model.train().requires_grad_(True)
    opt = _optimizer(model, head)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, RECIPE["lr"], total_steps=RECIPE["steps"])
    groups = RECIPE["groups"]
    target = torch.arange(k).repeat(groups)
    for _ in progress(range(RECIPE["steps"]), desc="pretraining tiny CLIP on synthetic captions (once)",
                      unit="steps"):
        idx = (torch.randint(len(blocks), (groups,), generator=gen)[:, None] * k + torch.arange(k)).reshape(-1)
        image = model.encode_image(pixels[idx])  # [G·k, E]
        txt = F.normalize(_encode_short_text(model, text[idx]), dim=-1).view(groups, k, -1)
        loss = _group_contrast(model, image, txt) + RECIPE["label_weight"] * F.cross_entropy(head(image), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    model.eval().requires_grad_(False)


def _label_head(model: open_clip.model.CLIP, classes: int) -> torch.nn.Linear:
    with torch.random.fork_rng():
        torch.manual_seed(RECIPE["seed"])
        return torch.nn.Linear(model.text_projection.shape[1], classes)


def _optimizer(model: open_clip.model.CLIP, head: torch.nn.Linear) -> torch.optim.Optimizer:
    embedding = model.token_embedding.weight
    rest = [p for p in model.parameters() if p is not embedding] + list(head.parameters())
    return torch.optim.AdamW([{"params": rest}, {"params": [embedding], "weight_decay": 0.0}],
                             lr=RECIPE["lr"], weight_decay=0.1)


def _group_contrast(model: open_clip.model.CLIP, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss within each group: image [G·k, E] (unnormalised), text [G, k, E] (normalised)."""
    groups, k = text.shape[:2]
    image = F.normalize(image, dim=-1).view(groups, k, -1)
    logits = model.logit_scale.exp() * image @ text.transpose(1, 2)  # [G, k, k]
    target = torch.arange(k).repeat(groups)
    return (F.cross_entropy(logits.reshape(-1, k), target)
            + F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), target)) / 2


def _encode_short_text(model: open_clip.model.CLIP, text: torch.Tensor) -> torch.Tensor:
    """`encode_text` on sequences cut after their last EOT: equal for a causal text tower."""
    n = text.shape[1]
    x = model.token_embedding(text) + model.positional_embedding[:n]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    return x[torch.arange(len(text)), text.argmax(-1)] @ model.text_projection


def _normalise(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std
