"""Speed of the per-image prompt text encoder alone: official per-image loop vs batched shared-prefix path.

    python benchmarks/bench_textenc.py [--device cpu|cuda] [--model ViT-B-16|tiny] [--dataset office_home]
                                       [--batch 1] [--n-ctx 32] [--repeats 3] [--threads 1]

Random weights (nothing is downloaded), the data set's real class names. A training step is forward +
backward to the per-image context ``ctx [B, N_CTX, W]``; eval is a forward under ``no_grad``; bf16 autocast
on cuda, fp32 on cpu. `trip bench` measures whole TRIP steps (this plus the image path, loss and optimizer).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import open_clip
import torch
from torch import Tensor, nn

from trip.backbone import autocast
from trip.bench import CLASS_NAMES, build_model, time_pair
from trip.textenc import PromptTokens, build_prompt_tokens, encode_prompts, encode_prompts_naive


def _step_fns(encode: Callable[..., Tensor], model: nn.Module, tokens: PromptTokens,
              ctx: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train step, eval forward) closures for one encoder."""
    proj = torch.randn(tokens.num_classes, model.text_projection.shape[-1], device=ctx.device)  # [C, E]

    def train() -> None:
        ctx.grad = None
        with autocast(ctx.device):
            out = encode(model, tokens, ctx)  # [B, C, E]
        (out.float() * proj).sum().backward()

    def evaluate() -> None:
        with torch.no_grad(), autocast(ctx.device):
            encode(model, tokens, ctx)

    return train, evaluate


def measure_text_encoder(device: str, model_name: str, dataset: str, batch: int, n_ctx: int,
                         repeats: int) -> dict[str, float | int | str]:
    """Images/s of the naive and the fast encoder for a training step and an eval forward."""
    dev = torch.device(device)
    model = build_model(model_name).to(dev)
    tokens = build_prompt_tokens(model, open_clip.get_tokenizer("ViT-B-16"), CLASS_NAMES[dataset], n_ctx)
    ctx = (0.02 * torch.randn(batch, n_ctx, tokens.prefix.shape[-1], device=dev)).requires_grad_(True)
    small = PromptTokens(tokens.prefix[:2], tokens.suffix[:2], tokens.eot[:2], n_ctx)
    for encode in (encode_prompts, encode_prompts_naive):  # warm-up on two classes
        for fn in _step_fns(encode, model, small, ctx[:1].detach().requires_grad_(True)):
            fn()
    fast, naive = _step_fns(encode_prompts, model, tokens, ctx), _step_fns(encode_prompts_naive, model, tokens, ctx)
    result: dict[str, float | int | str] = {
        "device": device, "model": model_name, "dataset": dataset, "batch": batch,
        "classes": tokens.num_classes, "n_ctx": n_ctx, "suffix_len": tokens.max_eot + 1 - (1 + n_ctx),
    }
    for i, mode in enumerate(("train", "eval")):
        fast_s, naive_s = time_pair(fast[i], naive[i], dev, repeats, budget_s=float("inf"))
        result[f"fast_{mode}_img_s"], result[f"naive_{mode}_img_s"] = batch / fast_s, batch / naive_s
        result[f"{mode}_speedup"] = naive_s / fast_s
    return result


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'tiny'")
    parser.add_argument("--dataset", default="office_home", choices=sorted(CLASS_NAMES))
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 1 cpu, 16 cuda)")
    parser.add_argument("--n-ctx", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--threads", type=int, default=1, help="cpu threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (1 if args.device == "cpu" else 16)
    r = measure_text_encoder(args.device, args.model, args.dataset, batch, args.n_ctx, args.repeats)
    print(f"{r['model']} on {r['device']} ({torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}): "
          f"batch {batch}, {r['dataset']} {r['classes']} classes, N_CTX {r['n_ctx']}, "
          f"suffix {r['suffix_len']} tokens, median of {args.repeats}")
    for mode in ("train", "eval"):
        naive, fast, ratio = r[f"naive_{mode}_img_s"], r[f"fast_{mode}_img_s"], r[f"{mode}_speedup"]
        print(f"  {mode:5s}  naive {naive:9.3g} img/s   fast {fast:9.3g} img/s   speedup x{ratio:.1f}")


if __name__ == "__main__":
    main()
