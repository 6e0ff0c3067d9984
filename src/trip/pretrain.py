"""Contrastive pretraining of the tiny CLIP on the synthetic caption corpus, so the demo's backbone
knows the synthetic classes a little, as real CLIP knows real ones. Done once, then cached in a checksummed
file (`trip.safefile`): a file cut short or altered is pretrained again, with a warning."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

from trip import safefile
from trip.data import synthetic
from trip.paths import cache_dir
from trip.tinyclip import CLIP_MEAN, CLIP_STD, TINY_CFG, new_tiny_clip

# version 3: the same weights as 2, in a checksummed file (a version-2 file has no checksum to verify)
PRETRAIN = {"version": 3, "images": 2400, "steps": 600, "groups": 16, "lr": 4e-3, "seed": 0}


def pretrained_tiny_clip() -> tuple[open_clip.model.CLIP, str]:
    key = hashlib.sha256(json.dumps([TINY_CFG, PRETRAIN, synthetic.GENERATOR_VERSION], sort_keys=True).encode())
    key = key.hexdigest()[:12]
    path = cache_dir() / f"tiny-clip-synthetic-{key}.safetensors"
    model = new_tiny_clip()
    if not (path.is_file() and _load(model, path)):
        model = new_tiny_clip()  # a failed load may have filled part of it
        pretrain(model)
        safefile.store_in_cache(lambda: safefile.write_tensors(path, model.state_dict()), "pretrained tiny CLIP",
                                path)
    return model, f"tiny:synthetic-{key}"


def _load(model: open_clip.model.CLIP, path: Path) -> bool:
    try:
        tensors, _ = safefile.read_tensors(path)
        model.load_state_dict(tensors)
    except (safefile.BadFile, RuntimeError) as err:  # RuntimeError: missing, unexpected or misshapen keys
        safefile.warn_rebuild("pretrained tiny CLIP", path, str(err).splitlines()[0])
        return False
    return True


def pretrain(model: open_clip.model.CLIP) -> None:
    """CLIP's contrastive loss inside groups of captions of one style and every class. Plain in-batch
    contrast on so small a model learns colours and styles first and shapes barely (zero-shot stays
    at chance after minutes); within a group only the shape tells the captions apart."""
    k = len(synthetic.CLASSES)
    images, captions, labels = synthetic.caption_corpus(PRETRAIN["images"], seed=PRETRAIN["seed"],
                                                        size=TINY_CFG["vision_cfg"]["image_size"])
    blocks = torch.from_numpy(labels).view(-1, k)  # the corpus cycles classes: one block = one style
    assert (blocks == torch.arange(k)).all(), "caption_corpus no longer cycles through the classes"
    pixels = _normalise(images)  # [n, 3, s, s]
    text = open_clip.get_tokenizer("ViT-B-16")(captions)  # [n, 77]
    text = text[:, : int(text.argmax(-1).max()) + 1]  # causal + EOT pooling: later positions never matter
    gen = torch.Generator().manual_seed(PRETRAIN["seed"])
    model.train().requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PRETRAIN["lr"], total_steps=PRETRAIN["steps"])
    target = torch.arange(k).repeat(PRETRAIN["groups"])
    for _ in tqdm(range(PRETRAIN["steps"]), desc="pretraining tiny CLIP on synthetic captions (once)",
                  leave=False):
        idx = (torch.randint(len(blocks), (PRETRAIN["groups"],), generator=gen)[:, None] * k
               + torch.arange(k)).reshape(-1)
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1).view(PRETRAIN["groups"], k, -1)
        txt = F.normalize(_encode_short_text(model, text[idx]), dim=-1).view(PRETRAIN["groups"], k, -1)
        logits = model.logit_scale.exp() * img @ txt.transpose(1, 2)  # [G, k, k]
        loss = (F.cross_entropy(logits.reshape(-1, k), target)
                + F.cross_entropy(logits.transpose(1, 2).reshape(-1, k), target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
    model.eval().requires_grad_(False)


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
