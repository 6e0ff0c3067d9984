"""Per-image prompt text encoder: the fast shared-prefix path equals the official per-image loop."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from torch import Tensor, nn

from trip import textenc
from trip.errors import TripError
from trip.textenc import (
    PromptTokens,
    auto_class_chunk,
    build_prompt_tokens,
    encode_class_texts,
    encode_prompts,
    encode_prompts_naive,
    prompt_texts,
)

NAMES = ["dog", "tennis racket", "t-shirt", "Real World", "alarm_clock"]
TEXT_CFG = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}
VISION_CFG = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}


def tiny_clip(**text_overrides: object) -> nn.Module:
    torch.manual_seed(0)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=VISION_CFG, text_cfg={**TEXT_CFG, **text_overrides},
                                 quick_gelu=True)
    return model.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def tokenizer():
    return open_clip.get_tokenizer("ViT-B-16")


@pytest.fixture(scope="module")
def tiny64() -> nn.Module:
    return tiny_clip().double()


@pytest.fixture(scope="module")
def vit_b16_64() -> nn.Module:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None)
    return model.eval().requires_grad_(False).double()


def random_ctx(batch: int, n_ctx: int, width: int, dtype: torch.dtype = torch.float64,
               seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 * torch.randn(batch, n_ctx, width, generator=g, dtype=dtype)).requires_grad_(True)


def features_and_grad(encode, model: nn.Module, tokens: PromptTokens, ctx: Tensor,
                      **kw) -> tuple[Tensor, Tensor]:
    """Features [B, C, E] and d(sum of a fixed random projection)/d ctx."""
    out = encode(model, tokens, ctx, **kw)
    proj = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (grad,) = torch.autograd.grad((out * proj).sum(), ctx)
    return out.detach(), grad


# --------------------------------------------------------------------------------------------------
# prompt tokens
# --------------------------------------------------------------------------------------------------


def test_prompt_texts_replace_underscores() -> None:
    assert prompt_texts(["alarm_clock", "dog"], 3) == ["X X X alarm clock.", "X X X dog."]


def test_build_prompt_tokens_layout(tiny64: nn.Module, tokenizer) -> None:
    n_ctx = 4
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, n_ctx)
    ids = tokenizer(prompt_texts(NAMES, n_ctx))  # [C, L]
    emb = tiny64.token_embedding(ids)  # [C, L, W]
    assert tokens.prefix.shape == (5, 1, 64) and tokens.suffix.shape == (5, 77 - 1 - n_ctx, 64)
    assert torch.equal(tokens.eot, ids.argmax(-1)) and tokens.eot.dtype == torch.int64
    assert torch.equal(tokens.prefix, emb[:, :1]) and torch.equal(tokens.suffix, emb[:, 1 + n_ctx:])
    assert tokens.max_eot == int(ids.argmax(-1).max()) and tokens.seq_len == 77 and tokens.n_ctx == n_ctx
    assert not tokens.prefix.requires_grad and not tokens.suffix.requires_grad


def test_build_prompt_tokens_rejects_bad_input(tiny64: nn.Module, tokenizer) -> None:
    with pytest.raises(TripError):
        build_prompt_tokens(tiny64, tokenizer, NAMES, 0)
    with pytest.raises(TripError):
        build_prompt_tokens(tiny64, tokenizer, [], 4)


# --------------------------------------------------------------------------------------------------
# naive path == open_clip's encode_text
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny64", "vit_b16_64"])
def test_naive_equals_encode_text_with_literal_x(model_name: str, tokenizer, request) -> None:
    model = request.getfixturevalue(model_name)
    n_ctx = 4
    names = NAMES[:2] if model_name == "vit_b16_64" else NAMES
    ids = tokenizer(prompt_texts(names, n_ctx))  # [C, L]
    ctx = model.token_embedding(ids[:1, 1 : 1 + n_ctx])  # [1, N_CTX, W]: the embedded "X" tokens
    tokens = build_prompt_tokens(model, tokenizer, names, n_ctx)
    ours = encode_prompts_naive(model, tokens, ctx)[0]  # [C, E]
    torch.testing.assert_close(ours, model.encode_text(ids), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# fast path == naive path (features and gradients)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_ctx", [1, 4, 16])
@pytest.mark.parametrize("class_chunk", [None, 1, 2])
def test_fast_equals_naive_fp64(tiny64: nn.Module, tokenizer, n_ctx: int, class_chunk: int | None) -> None:
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, n_ctx)
    ctx = random_ctx(3, n_ctx, 64)
    ref, ref_grad = features_and_grad(encode_prompts_naive, tiny64, tokens, ctx)
    out, grad = features_and_grad(encode_prompts, tiny64, tokens, ctx, class_chunk=class_chunk)
    assert out.shape == (3, len(NAMES), 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)


def test_fast_equals_naive_vit_b16_shape(vit_b16_64: nn.Module, tokenizer) -> None:
    names = NAMES[:2]
    tokens = build_prompt_tokens(vit_b16_64, tokenizer, names, 4)
    ctx = random_ctx(2, 4, 512, seed=3)
    ref, ref_grad = features_and_grad(encode_prompts_naive, vit_b16_64, tokens, ctx)
    out, grad = features_and_grad(encode_prompts, vit_b16_64, tokens, ctx)
    assert out.shape == (2, 2, 512)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-11)


def test_fast_equals_naive_fp32(tokenizer) -> None:
    model = tiny_clip()
    tokens = build_prompt_tokens(model, tokenizer, NAMES, 4)
    ctx = random_ctx(3, 4, 64, dtype=torch.float32)
    ref, ref_grad = features_and_grad(encode_prompts_naive, model, tokens, ctx)
    out, grad = features_and_grad(encode_prompts, model, tokens, ctx, class_chunk=2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_shared_context_batch_of_one(tiny64: nn.Module, tokenizer) -> None:
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, 16)
    ctx = random_ctx(1, 16, 64)
    out = encode_prompts(tiny64, tokens, ctx)
    assert out.shape == (1, len(NAMES), 32)
    torch.testing.assert_close(out, encode_prompts_naive(tiny64, tokens, ctx), rtol=0, atol=1e-12)


def test_auto_chunking_checkpoints_and_stays_exact(tiny64: nn.Module, tokenizer, monkeypatch) -> None:
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, 4)
    ctx = random_ctx(3, 4, 64)
    ref, ref_grad = features_and_grad(encode_prompts_naive, tiny64, tokens, ctx)
    monkeypatch.setattr(textenc, "CHUNK_ELEMENT_BUDGET", 1)  # forces one class per chunk
    out, grad = features_and_grad(encode_prompts, tiny64, tokens, ctx)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(tiny64, tokens, ctx), ref, rtol=0, atol=1e-12)


def test_auto_class_chunk_rule() -> None:
    domainnet = dict(batch=32, classes=345, prefix_len=33, suffix_len=7, width=512, heads=8, layers=12)
    assert auto_class_chunk(**domainnet, training=True) == 345  # one chunk under 16-bit autocast
    assert auto_class_chunk(**domainnet, training=False) == 345
    assert 1 <= auto_class_chunk(**{**domainnet, "batch": 128}, training=True) < 345
    assert auto_class_chunk(**{**domainnet, "batch": 10**9}, training=True) == 1


# --------------------------------------------------------------------------------------------------
# frozen model, precision, errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encode", [encode_prompts, encode_prompts_naive])
def test_only_ctx_gets_gradients(tiny64: nn.Module, tokenizer, encode) -> None:
    before = copy.deepcopy(tiny64.state_dict())
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, 4)
    ctx = random_ctx(2, 4, 64)
    encode(tiny64, tokens, ctx).square().sum().backward()
    assert ctx.grad is not None and bool(ctx.grad.abs().sum() > 0)
    assert all(p.grad is None for p in tiny64.parameters())
    after = tiny64.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bf16_autocast_cpu_close_to_fp32(tokenizer) -> None:
    model = tiny_clip()
    tokens = build_prompt_tokens(model, tokenizer, NAMES, 4)
    ctx = random_ctx(2, 4, 64, dtype=torch.float32)
    ref = encode_prompts(model, tokens, ctx).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encode_prompts(model, tokens, ctx)
        naive = encode_prompts_naive(model, tokens, ctx)
    out.float().sum().backward()
    assert ctx.grad is not None and bool(torch.isfinite(ctx.grad).all())
    for got in (out, naive):
        err = (got.float() - ref).norm() / ref.norm()
        assert err < 0.05, err


def test_encode_class_texts_matches_encode_text(tiny64: nn.Module, tokenizer) -> None:
    texts = ["a photo of a dog.", "a sketch of a tennis racket, a kind of sports equipment.", "t-shirt"]
    expected = tiny64.encode_text(tokenizer(texts))
    got = encode_class_texts(tiny64, tokenizer, texts, batch_size=2)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_encode_class_texts_plain_when_not_causal(tokenizer) -> None:
    model = tiny_clip(no_causal_mask=True).double()
    texts = ["a photo of a dog.", "a painting of a mug."]
    expected = model.encode_text(tokenizer(texts))
    torch.testing.assert_close(encode_class_texts(model, tokenizer, texts), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("overrides", [{"qk_norm": True}, {"no_causal_mask": True}])
def test_unsupported_blocks_or_masks_raise(tokenizer, overrides: dict[str, object]) -> None:
    model = tiny_clip(**overrides)
    tokens = build_prompt_tokens(model, tokenizer, NAMES[:2], 2)
    with pytest.raises(TripError, match="text"):
        encode_prompts(model, tokens, torch.zeros(1, 2, 64))


def test_non_eot_pooling_raises(tokenizer) -> None:
    with pytest.raises(TripError, match="pool"):
        build_prompt_tokens(tiny_clip(pool_type="last"), tokenizer, NAMES[:2], 2)


def test_wrong_ctx_shape_raises(tiny64: nn.Module, tokenizer) -> None:
    tokens = build_prompt_tokens(tiny64, tokenizer, NAMES, 4)
    with pytest.raises(ValueError):
        encode_prompts(tiny64, tokens, torch.zeros(2, 3, 64, dtype=torch.float64))
    with pytest.raises(ValueError):
        encode_prompts(tiny64, tokens, torch.zeros(2, 4, 64, dtype=torch.float64), class_chunk=0)
