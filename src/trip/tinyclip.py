"""The test-sized CLIP as data: its open_clip config, the CLIP normalisation, and its fixed random init. The
backbone loader and the tiny CLIP's pretraining both build on this module."""

from __future__ import annotations

import open_clip
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A test-sized CLIP: 32 px images in 4 px patches (an 8x8 token grid plus CLS), 2-layer towers.
TINY_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "patch_size": 4, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def new_tiny_clip() -> open_clip.model.CLIP:
    with torch.random.fork_rng():
        torch.manual_seed(0)  # random weights that are the same every time (a stable cache identity)
        return open_clip.model.CLIP(**TINY_CFG, quick_gelu=True)
