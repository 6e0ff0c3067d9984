"""Memory of a DomainNet-sized training step: the class chunking of the fast text encoder keeps the
activations within the element budget (arithmetic only, nothing big is allocated)."""

from __future__ import annotations

from functools import cache

import open_clip
import pytest

from trip import textenc
from trip.data.benchmarks import DOMAINNET_CLASSES
from trip.textenc import auto_class_chunk, prompt_texts

N_CTX = 32
VIT_B16_TEXT = {"width": 512, "heads": 8, "layers": 12}


@cache
def _suffix_len(class_names: tuple[str, ...], n_ctx: int) -> int:
    """Positions after SOS + context that can reach an EOT, as the fast encoder runs them."""
    ids = open_clip.get_tokenizer("ViT-B-16")(prompt_texts(class_names, n_ctx))
    return int(ids.argmax(-1).max()) + 1 - (1 + n_ctx)


def _chunk_elements(chunk: int, batch: int, suffix: int, *, training: bool) -> int:
    """Elements one chunk of classes keeps: per suffix token and layer 16 W (hidden states, MLP) plus
    3 attention rows of heads x (prefix + suffix) keys; every layer when training, one in eval."""
    w, h, layers = VIT_B16_TEXT["width"], VIT_B16_TEXT["heads"], VIT_B16_TEXT["layers"]
    per_token = 16 * w + 3 * h * (1 + N_CTX + suffix)
    return chunk * batch * suffix * per_token * (layers if training else 1)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("batch", [16, 32, 128])
@pytest.mark.parametrize(("itemsize", "budget"), [(2, 2**30), (2, 12 * 2**30), (4, 12 * 2**30)])
def test_domainnet_step_chunks_stay_within_the_budget(monkeypatch, training, batch, itemsize, budget):
    monkeypatch.setattr(textenc, "CHUNK_ELEMENT_BUDGET", budget)
    suffix = _suffix_len(DOMAINNET_CLASSES, N_CTX)
    classes = len(DOMAINNET_CLASSES)
    chunk = auto_class_chunk(batch, classes, 1 + N_CTX, suffix, **VIT_B16_TEXT, training=training,
                             itemsize=itemsize)
    allowed = budget * 2 // itemsize  # the budget counts 16-bit elements: half as many at fp32
    assert 1 <= chunk <= classes
    assert _chunk_elements(chunk, batch, suffix, training=training) <= allowed
    assert chunk == classes or _chunk_elements(chunk + 1, batch, suffix, training=training) > allowed


def test_paper_domainnet_step_is_one_chunk_under_bf16():
    """Batch 32, N_CTX 32, 345 classes, ViT-B-16 text tower under 16-bit autocast: one chunk, ~20 GB."""
    suffix = _suffix_len(DOMAINNET_CLASSES, N_CTX)
    chunk = auto_class_chunk(32, 345, 1 + N_CTX, suffix, **VIT_B16_TEXT, training=True, itemsize=2)
    assert chunk == 345
    assert _chunk_elements(chunk, 32, suffix, training=True) * 2 < 24e9  # bytes at 16 bits
