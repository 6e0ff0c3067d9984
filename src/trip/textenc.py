"""Text encoding of CoOp-style prompts whose context differs per image.

Every image i has its own context ``ctx[i]`` (``[N_CTX, W]``), so one step encodes B x C sequences
``[SOS] ctx[i] <class c tokens> . [EOT] pad...``. Two paths compute the same features:

* :func:`encode_prompts_naive`: the official code's loop over images, each running C full-length
  sequences through ``model.transformer`` exactly as ``CLIP.encode_text`` does. Reference and baseline.
* :func:`encode_prompts`: one batched computation, equal up to float reduction order (docs/method.md §10 items 3-6).
  Sequences end at the last EOT (the tower is causal and pools at EOT). Positions 0..N_CTX (SOS + ctx)
  are the same for every class of an image and, being causal, never see the class tokens: they run once
  per image, and the class suffixes attend to their cached keys/values. Classes run in chunks.

A class-specific context (CSC, ``ctx[i, c]``: FedAPT's) shares no prefix between classes:
:func:`encode_class_specific` runs every (image, class) sequence in full, cut after the longest EOT.

The fast path supports the standard open_clip text tower (``ResidualAttentionBlock`` with
``nn.MultiheadAttention``, causal mask, argmax/EOT pooling); anything else raises :class:`TripError`.
The caller freezes the model (``requires_grad_(False)``); then only ``ctx`` receives gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from trip.errors import TripError

# Auto class chunk (see `auto_class_chunk`): elements one chunk's suffix activations may use, counted at
# 16 bits (halved for fp32 compute).
CHUNK_ELEMENT_BUDGET = 12 * 2**30
# Elements per suffix token and layer, in units of the width W, plus the attention rows (heads x keys).
# Training: saved for backward, measured ~14 W + attention on open_clip's block (QuickGELU; fp32 and bf16
# autocast), rounded up. Eval (no graph): the live working set of one block.
SAVED_PER_TOKEN_LAYER = 16
LIVE_PER_TOKEN_EVAL = 16
ATTN_COPIES = 3

Tokenizer = Callable[[list[str]], Tensor]


# --------------------------------------------------------------------------------------------------
# Prompt tokens
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTokens:
    """Frozen token embeddings around the learnable context (CoOp layout, class token at the end)."""

    prefix: Tensor  # [C, 1, W] SOS embedding
    suffix: Tensor  # [C, L-1-N_CTX, W] class tokens, ".", EOT, padding
    eot: Tensor  # [C] int64, EOT position in the full sequence
    n_ctx: int
    max_eot: int = field(init=False)  # host copy of eot.max(), so the fast path never syncs

    def __post_init__(self) -> None:
        c = self.prefix.shape[0]
        if self.prefix.shape[1:2] != (1,) or self.suffix.ndim != 3 or self.suffix.shape[0] != c:
            raise ValueError(f"bad token shapes {tuple(self.prefix.shape)} / {tuple(self.suffix.shape)}")
        if self.eot.shape != (c,):
            raise ValueError(f"eot must be [C]={c}, got {tuple(self.eot.shape)}")
        if int(self.eot.min()) < self.n_ctx + 2:
            raise ValueError("every EOT must follow the context and at least one class token")
        if not torch.equal(self.prefix, self.prefix[:1].expand_as(self.prefix)):
            raise ValueError("the prefix (SOS) must be the same for every class")
        object.__setattr__(self, "max_eot", int(self.eot.max()))

    @property
    def num_classes(self) -> int:
        return self.prefix.shape[0]

    @property
    def seq_len(self) -> int:
        """Full sequence length L (the model's context length)."""
        return 1 + self.n_ctx + self.suffix.shape[1]

    def __getitem__(self, classes: list[int]) -> PromptTokens:
        """The tokens of some classes (`Split.columns`): those of a method built on that class list."""
        return PromptTokens(self.prefix[classes], self.suffix[classes], self.eot[classes], self.n_ctx)

    def to(self, device: torch.device | str) -> PromptTokens:
        return PromptTokens(self.prefix.to(device), self.suffix.to(device), self.eot.to(device), self.n_ctx)


def prompt_texts(class_names: Sequence[str], n_ctx: int) -> list[str]:
    """``"X X ... X <class name>."`` with ``n_ctx`` X's and ``_`` in class names read as spaces."""
    placeholder = " ".join(["X"] * n_ctx)
    return [f"{placeholder} {name.replace('_', ' ')}." for name in class_names]


@torch.no_grad()
def build_prompt_tokens(
    model: nn.Module, tokenizer: Tokenizer, class_names: Sequence[str], n_ctx: int
) -> PromptTokens:
    """Tokenize the placeholder prompts and keep the frozen SOS/suffix embeddings and EOT positions."""
    if n_ctx < 1:
        raise TripError(f"n_ctx must be at least 1, got {n_ctx}")
    if not class_names:
        raise TripError("no class names given")
    tower = _text_tower(model)
    device = tower.token_embedding.weight.device
    ids = tokenizer(prompt_texts(class_names, n_ctx)).to(device)  # [C, L]
    if ids.shape[1] != tower.positional_embedding.shape[0]:
        n_pos = tower.positional_embedding.shape[0]
        raise TripError(f"tokenizer context length {ids.shape[1]} != model context length {n_pos}")
    ctx_ids = ids[:, 1 : 1 + n_ctx]
    if not bool((ctx_ids == ctx_ids[:1, :1]).all()):
        raise TripError("the tokenizer did not map the N_CTX placeholders to one token each")
    emb = tower.token_embedding(ids).detach()  # [C, L, W]
    eot = ids.argmax(dim=-1)  # EOT has the largest id
    too_long = [name for name, e in zip(class_names, eot.tolist(), strict=True) if e < n_ctx + 2]
    if too_long:
        raise TripError(f"class names do not fit the context after {n_ctx} context tokens: {too_long[:5]}")
    return PromptTokens(emb[:, :1].clone(), emb[:, 1 + n_ctx :].clone(), eot, n_ctx)


# --------------------------------------------------------------------------------------------------
# The open_clip text tower
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TextTower:
    token_embedding: nn.Embedding
    positional_embedding: Tensor  # [L, W]
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: nn.Linear | Tensor | None
    attn_mask: Tensor | None  # [L, L] additive causal mask, None = bidirectional

    @property
    def cast_dtype(self) -> torch.dtype:
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if get is not None else self.token_embedding.weight.dtype

    def project(self, x: Tensor) -> Tensor:  # [..., W] -> [..., E]
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection


def _text_tower(model: nn.Module) -> _TextTower:
    """The text parts of an open_clip ``CLIP`` (attributes on the model) or a ``TextTransformer``."""
    src = model
    if not (hasattr(src, "transformer") and hasattr(src, "token_embedding")):
        src = getattr(model, "text", None)
    if src is None or not (hasattr(src, "transformer") and hasattr(src, "token_embedding")):
        raise TripError(f"{type(model).__name__} has no open_clip text transformer (HF text towers are "
                        "not supported)")
    if getattr(src, "cls_emb", None) is not None or getattr(src, "use_pad_mask", False):
        raise TripError("text towers with an appended class token or a padding mask are not supported")
    pool = getattr(src, "text_pool_type", None) or getattr(src, "pool_type", "argmax")
    if pool != "argmax":
        raise TripError(f"text pool type {pool!r} is not supported; prompts pool at the EOT (argmax)")
    return _TextTower(
        token_embedding=src.token_embedding,
        positional_embedding=src.positional_embedding,
        transformer=src.transformer,
        ln_final=src.ln_final,
        text_projection=src.text_projection,
        attn_mask=src.attn_mask,
    )


def _supported_blocks(tower: _TextTower) -> list[ResidualAttentionBlock]:
    """The transformer blocks, checked to be ones whose math the fast path reproduces."""
    if tower.attn_mask is None:
        raise TripError("the text tower is not causal: the shared-prefix encoder needs a causal mask")
    blocks = list(tower.transformer.resblocks)
    for i, blk in enumerate(blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, ResidualAttentionBlock) or hasattr(blk, "ln_1_kv"):
            raise TripError(f"text block {i} is a {type(blk).__name__}; the fast text encoder supports only "
                            "open_clip's ResidualAttentionBlock (use encode_prompts_naive)")
        if (not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim
                or attn.bias_k is not None or attn.add_zero_attn or (attn.training and attn.dropout > 0)):
            raise TripError(f"text block {i} uses an attention variant the fast text encoder does not "
                            "support (use encode_prompts_naive)")
    return blocks


# --------------------------------------------------------------------------------------------------
# Reference path (the official per-image loop)
# --------------------------------------------------------------------------------------------------


def encode_prompts_naive(model: nn.Module, tokens: PromptTokens, ctx: Tensor) -> Tensor:
    """Per image, C full-length sequences through ``model.transformer`` as ``encode_text``. -> [B, C, E]"""
    tower = _text_tower(model)
    _check_ctx(tokens, ctx)
    dt = tower.cast_dtype
    prefix, suffix = tokens.prefix.to(dt), tokens.suffix.to(dt)  # [C, 1, W], [C, L-1-n, W]
    pos = tower.positional_embedding.to(dt)  # [L, W]
    rows = torch.arange(tokens.num_classes, device=ctx.device)
    feats = []
    for i in range(ctx.shape[0]):
        ctx_i = ctx[i].to(dt).expand(tokens.num_classes, -1, -1)  # [C, n, W]
        x = torch.cat([prefix, ctx_i, suffix], dim=1) + pos  # [C, L, W]
        x = tower.transformer(x, attn_mask=tower.attn_mask)
        x = tower.ln_final(x)[rows, tokens.eot]  # [C, W]
        feats.append(tower.project(x))
    return torch.stack(feats)  # [B, C, E]


def _check_ctx(tokens: PromptTokens, ctx: Tensor) -> None:
    if ctx.ndim != 3 or ctx.shape[1] != tokens.n_ctx or ctx.shape[2] != tokens.prefix.shape[2]:
        raise ValueError(f"ctx must be [B, {tokens.n_ctx}, {tokens.prefix.shape[2]}], got {tuple(ctx.shape)}")


# --------------------------------------------------------------------------------------------------
# Fast path
# --------------------------------------------------------------------------------------------------


def auto_class_chunk(batch: int, classes: int, prefix_len: int, suffix_len: int, width: int, heads: int,
                     layers: int, *, training: bool, itemsize: int = 2) -> int:
    """Classes per chunk so that one chunk's suffix activations stay within the element budget.

    One suffix token costs ``16*W + 3*heads*(P+S)`` elements per layer (hidden states, MLP, attention
    rows), kept for all ``layers`` when training (saved for backward) and for one layer in eval. A chunk
    of Cc classes holds ``B*Cc*S`` suffix tokens; Cc is the largest count within ``CHUNK_ELEMENT_BUDGET``
    (12 Gi elements at 16-bit compute, half of that at fp32, ~25-30 GB), at least 1. A DomainNet step
    (B=32, C=345, N_CTX=32, S~7, ViT-B-16 under bf16 autocast) needs ~8.5 G and runs as one chunk, ~20 GB.
    Training in several chunks checkpoints each chunk, so memory stays bounded (suffix recomputed once).
    """
    per_token = (SAVED_PER_TOKEN_LAYER if training else LIVE_PER_TOKEN_EVAL) * width
    per_token += ATTN_COPIES * heads * (prefix_len + suffix_len)
    per_class = batch * suffix_len * per_token * (layers if training else 1)
    budget = CHUNK_ELEMENT_BUDGET * 2 // max(itemsize, 2)
    return max(1, min(classes, budget // max(per_class, 1)))


def encode_prompts(model: nn.Module, tokens: PromptTokens, ctx: Tensor, *,
                   class_chunk: int | None = None) -> Tensor:
    """Text features of every (image, class) prompt, batched with a shared prefix. ctx [B, n, W] -> [B, C, E].

    Equal to :func:`encode_prompts_naive` up to float reduction order, gradients to ``ctx`` included.
    ``class_chunk`` bounds memory (``None``: :func:`auto_class_chunk`); when training in more than one
    chunk, each chunk is activation-checkpointed. Works in fp32/fp64 and under ``torch.autocast``.
    """
    tower = _text_tower(model)
    blocks = _supported_blocks(tower)
    _check_ctx(tokens, ctx)
    dt = tower.cast_dtype
    B, n, W = ctx.shape
    P, C = 1 + n, tokens.num_classes
    S = tokens.max_eot + 1 - P  # suffix positions that can reach an EOT
    pos = tower.positional_embedding.to(dt)  # [L, W]

    x_pre = torch.cat([tokens.prefix[:1].to(dt).expand(B, -1, -1), ctx.to(dt)], dim=1) + pos[:P]  # [B, P, W]
    prefix_kv = _run_prefix(blocks, x_pre)
    x_suf = tokens.suffix[:, :S].to(dt) + pos[P : P + S]  # [C, S, W], same for every image
    q_eot = tokens.eot - P  # [C] EOT index inside the suffix

    training = torch.is_grad_enabled() and ctx.requires_grad
    if class_chunk is None:
        itemsize = 2 if torch.is_autocast_enabled(ctx.device.type) else torch.finfo(dt).bits // 8
        heads = blocks[0].attn.num_heads
        chunk = auto_class_chunk(B, C, P, S, W, heads, len(blocks), training=training, itemsize=itemsize)
    elif class_chunk < 1:
        raise ValueError(f"class_chunk must be positive, got {class_chunk}")
    else:
        chunk = class_chunk
    use_ckpt = training and chunk < C
    outs = []
    for c0 in range(0, C, chunk):
        args = (blocks, prefix_kv, x_suf[None, c0 : c0 + chunk], q_eot[c0 : c0 + chunk])
        out = checkpoint(_run_suffix, *args, use_reentrant=False) if use_ckpt else _run_suffix(*args)
        outs.append(out)  # [B, Cc, W]
    x = tower.ln_final(torch.cat(outs, dim=1))  # [B, C, W]
    return tower.project(x)  # [B, C, E]


def _heads(x: Tensor, n_head: int) -> Tensor:  # [B, T, W] -> [B, H, T, d]
    return x.unflatten(-1, (n_head, -1)).transpose(1, 2)


def _suffix_heads(x: Tensor, n_head: int) -> Tensor:  # [b, Cc, T, W] -> [b, H, Cc, T, d]
    return x.unflatten(-1, (n_head, -1)).permute(0, 3, 1, 2, 4)


def _in_proj(blk: ResidualAttentionBlock, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v of ``ln_1(x)``, each [..., T, W]."""
    qkv = F.linear(blk.ln_1(x), blk.attn.in_proj_weight, blk.attn.in_proj_bias)  # [..., T, 3W]
    return qkv.chunk(3, dim=-1)


def _finish_block(blk: ResidualAttentionBlock, x: Tensor, attn: Tensor) -> Tensor:
    """Output projection, residuals and MLP of a block; x and the head-merged attn are [..., T, W]."""
    out = blk.attn.out_proj
    x = x + blk.ls_1(F.linear(attn, out.weight, out.bias))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def _run_prefix(blocks: list[ResidualAttentionBlock], x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Run SOS + ctx ([B, P, W]) through the blocks; return each layer's keys and values [B, H, P, d]."""
    kv = []
    for i, blk in enumerate(blocks):
        h = blk.attn.num_heads
        q, k, v = (_heads(t, h) for t in _in_proj(blk, x))
        kv.append((k, v))
        if i + 1 < len(blocks):  # the prefix's last-layer output is never pooled
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, P, d]
            x = _finish_block(blk, x, a.transpose(1, 2).flatten(-2))
    return kv


def _run_suffix(blocks: list[ResidualAttentionBlock], prefix_kv: list[tuple[Tensor, Tensor]],
                x: Tensor, q_eot: Tensor) -> Tensor:
    """Class suffixes x [1, Cc, S, W] through the blocks, attending to the prefix. -> EOT rows [B, Cc, W]"""
    S = x.shape[-2]
    k_pos = torch.arange(S, device=x.device)
    for i, blk in enumerate(blocks):
        h = blk.attn.num_heads
        q, k, v = _in_proj(blk, x)  # [b, Cc, S, W] each; b = 1 on layer 0 (no image term yet), else B
        if i + 1 == len(blocks):  # last layer: only the EOT query of each class is pooled
            rows = torch.arange(x.shape[1], device=x.device)
            x, q = x[:, rows, q_eot].unsqueeze(-2), q[:, rows, q_eot].unsqueeze(-2)  # [b, Cc, 1, W]
            q_pos = q_eot[:, None]  # [Cc, 1]
        else:
            q_pos = k_pos[None, :]  # [1, S]
        visible = k_pos <= q_pos[..., None]  # [Cc|1, Sq, S] causal within the suffix
        kp, vp = prefix_kv[i]
        a = _attend(_suffix_heads(q, h), _suffix_heads(k, h), _suffix_heads(v, h), kp, vp, visible)
        x = _finish_block(blk, x, a.permute(0, 2, 3, 1, 4).flatten(-2))  # a: [B, H, Cc, Sq, d]
    return x[..., 0, :]  # the last layer kept only the EOT rows


def _attend(q: Tensor, k: Tensor, v: Tensor, kp: Tensor, vp: Tensor, visible: Tensor) -> Tensor:
    """Attention of suffix queries over [prefix keys of their image] + [causal suffix keys of their class].

    q [b, H, Cc, Sq, d]; k, v [b, H, Cc, S, d]; kp, vp [B, H, P, d]; visible [Cc|1, Sq, S]; b in {1, B}.
    The prefix part folds classes into the query rows ([B, H, Cc*Sq, d] @ [B, H, d, P]), so the prefix
    keys/values are never expanded over classes. -> [B, H, Cc, Sq, d]
    """
    B, P = kp.shape[0], kp.shape[-2]
    Cc, Sq = q.shape[2], q.shape[3]
    q = q * q.shape[-1] ** -0.5
    s_pre = (q.flatten(2, 3) @ kp.transpose(-1, -2)).unflatten(2, (Cc, Sq))  # [B, H, Cc, Sq, P]
    s_suf = (q @ k.transpose(-1, -2)).masked_fill(~visible, float("-inf"))  # [b, H, Cc, Sq, S]
    scores = torch.cat([s_pre, s_suf.expand(B, -1, -1, -1, -1)], dim=-1)  # [B, H, Cc, Sq, P+S]
    w = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype)
    out_pre = (w[..., :P].flatten(2, 3) @ vp).unflatten(2, (Cc, Sq))  # [B, H, Cc, Sq, d]
    return out_pre + w[..., P:] @ v


# --------------------------------------------------------------------------------------------------
# Class-specific contexts
# --------------------------------------------------------------------------------------------------


def encode_class_specific(model: nn.Module, tokens: PromptTokens, ctx: Tensor, *,
                          row_chunk: int | None = None) -> Tensor:
    """Text features of prompts whose context differs per image *and* class. ctx [B, C, n, W] -> [B, C, E]

    Each of the B x C sequences ``[SOS] ctx[i, c] <class c> . [EOT]`` runs through the tower as
    ``encode_text`` does, cut after the longest EOT (exact: the tower is causal and pools at the EOT), in
    chunks of ``row_chunk`` sequences (``None``: as many as the element budget allows)."""
    tower = _text_tower(model)
    if tower.attn_mask is None:
        raise TripError("the text tower is not causal: cutting the prompts after the EOT needs a causal mask")
    B, C, n, W = ctx.shape
    if C != tokens.num_classes:
        raise ValueError(f"ctx has {C} classes, the prompt tokens {tokens.num_classes}")
    _check_ctx(tokens, ctx[:, 0])
    dt = tower.cast_dtype
    T = tokens.max_eot + 1
    frozen_prefix = tokens.prefix.to(dt).expand(B, -1, -1, -1)  # [B, C, 1, W]
    frozen_suffix = tokens.suffix[:, : T - 1 - n].to(dt).expand(B, -1, -1, -1)
    x = torch.cat([frozen_prefix, ctx.to(dt), frozen_suffix], dim=2) + tower.positional_embedding[:T].to(dt)
    x, eot = x.flatten(0, 1), tokens.eot.repeat(B)  # [B*C, T, W], [B*C]
    if row_chunk is None:
        saved = SAVED_PER_TOKEN_LAYER * len(tower.transformer.resblocks) if ctx.requires_grad else LIVE_PER_TOKEN_EVAL
        row_chunk = max(1, CHUNK_ELEMENT_BUDGET // (T * W * saved))
    outs = []
    for r0 in range(0, x.shape[0], row_chunk):
        rows = tower.transformer(x[r0 : r0 + row_chunk], attn_mask=tower.attn_mask[:T, :T])
        picked = eot[r0 : r0 + row_chunk]
        outs.append(tower.ln_final(rows)[torch.arange(len(picked), device=rows.device), picked])
    return tower.project(torch.cat(outs)).unflatten(0, (B, C))


# --------------------------------------------------------------------------------------------------
# Hand-written sentences (zero-shot templates)
# --------------------------------------------------------------------------------------------------


def encode_class_texts(model: nn.Module, tokenizer: Tokenizer, texts: Sequence[str], *,
                       batch_size: int = 1024) -> Tensor:
    """Unnormalised text features of sentences, as ``model.encode_text``. -> [n, E]

    For the standard causal, EOT-pooled tower the sequences are cut after the longest EOT of each batch
    (exact: later positions are never attended to nor pooled); other towers use ``encode_text`` as is.
    """
    if not texts:
        raise TripError("no texts to encode")
    ids = tokenizer(list(texts))  # [n, L]
    tower = _causal_eot_tower(model)
    device = next(model.parameters()).device
    feats = []
    for s in range(0, ids.shape[0], batch_size):
        batch = ids[s : s + batch_size].to(device)
        feats.append(model.encode_text(batch) if tower is None else _encode_cut(tower, batch))
    return torch.cat(feats)


def _causal_eot_tower(model: nn.Module) -> _TextTower | None:
    """The text tower if it is causal and pools at the EOT (so cutting after the EOT is exact), else None."""
    try:
        tower = _text_tower(model)
    except TripError:
        return None
    return tower if tower.attn_mask is not None else None


def _encode_cut(tower: _TextTower, ids: Tensor) -> Tensor:
    """``encode_text`` on ids [n, L] truncated to the longest EOT + 1. -> [n, E]"""
    eot = ids.argmax(dim=-1)  # [n]
    T = int(eot.max()) + 1
    dt = tower.cast_dtype
    x = tower.token_embedding(ids[:, :T]).to(dt) + tower.positional_embedding[:T].to(dt)  # [n, T, W]
    x = tower.transformer(x, attn_mask=tower.attn_mask[:T, :T])
    x = tower.ln_final(x)[torch.arange(ids.shape[0], device=ids.device), eot]  # [n, W]
    return tower.project(x)
