"""Speed of the per-image prompt text encoder: official per-image loop vs batched shared-prefix path.

    python benchmarks/bench_textenc.py [--device cpu|cuda] [--model ViT-B-16|tiny] [--batch 4]
                                       [--classes 65] [--n-ctx 32] [--repeats 3] [--threads 1]

Random weights (nothing is downloaded). A training step is forward + backward to the per-image context
``ctx [B, N_CTX, W]``; eval is a forward under ``no_grad``. bf16 autocast on cuda, fp32 on cpu.
CPU defaults (batch 1, one repeat, one thread) finish in about half a minute; one thread because on a
shared CPU the many small ops of the fast path stall on busy OpenMP workers, which says nothing about
the method. The naive path is not warmed up at full size on cpu (a warm-up alone would take minutes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
from torch import Tensor, nn

from trip.textenc import PromptTokens, build_prompt_tokens, encode_prompts, encode_prompts_naive

_WORDS = ("dog", "alarm", "clock", "tennis", "racket", "shirt", "bottle", "chair", "mug", "kettle",
          "lamp", "laptop", "marker", "monitor", "mouse", "pencil", "scissors", "sink", "table", "toy")


def class_names(n: int) -> list[str]:
    """n distinct names of 1-3 words, plus DomainNet's longest one, so the suffix length is realistic."""
    names = ["The_Great_Wall_of_China"]
    i = 0
    while len(names) < n:
        words = [_WORDS[(i * 7 + j * 3) % len(_WORDS)] for j in range(1 + i % 3)]
        names.append(f"{'_'.join(words)}_{i}")
        i += 1
    return names[:n]


def build_model(model_name: str) -> nn.Module:
    if model_name == "tiny":
        model = open_clip.model.CLIP(
            embed_dim=32,
            vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
            text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
            quick_gelu=True,
        )
    else:
        model = open_clip.create_model(model_name, pretrained=None)
    return model.eval().requires_grad_(False)


def _time(fn: Callable[[], None], device: torch.device, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _step_fns(encode: Callable[..., Tensor], model: nn.Module, tokens: PromptTokens, ctx: Tensor,
              device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """(train step, eval forward) closures for one encoder."""
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    proj = torch.randn(tokens.num_classes, model.text_projection.shape[-1], device=device)  # [C, E]

    def train() -> None:
        ctx.grad = None
        with amp:
            out = encode(model, tokens, ctx)  # [B, C, E]
        (out.float() * proj).sum().backward()

    def evaluate() -> None:
        with torch.no_grad(), amp:
            encode(model, tokens, ctx)

    return train, evaluate


def measure_text_encoder(device: str, model_name: str, batch: int, classes: int, n_ctx: int,
                         repeats: int) -> dict[str, float | int | str]:
    """Images/s of the naive and the fast encoder for a training step and an eval forward."""
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(model_name).to(dev)
    tokens = build_prompt_tokens(model, open_clip.get_tokenizer("ViT-B-16"), class_names(classes), n_ctx)
    width = tokens.prefix.shape[-1]
    ctx = (0.02 * torch.randn(batch, n_ctx, width, device=dev)).requires_grad_(True)  # [B, N_CTX, W]
    small = PromptTokens(tokens.prefix[:2], tokens.suffix[:2], tokens.eot[:2], n_ctx)
    result: dict[str, float | int | str] = {
        "device": device, "model": model_name, "batch": batch, "classes": classes, "n_ctx": n_ctx,
        "suffix_len": tokens.max_eot + 1 - (1 + n_ctx),
    }
    for name, encode in (("naive", encode_prompts_naive), ("fast", encode_prompts)):
        for fn in _step_fns(encode, model, small, ctx[:1].detach().requires_grad_(True), dev):
            fn()
        train, evaluate = _step_fns(encode, model, tokens, ctx, dev)
        warmup = 1 if dev.type == "cuda" or name == "fast" else 0  # a full naive warm-up costs minutes on cpu
        result[f"{name}_train_img_s"] = batch / _time(train, dev, repeats, warmup)
        result[f"{name}_eval_img_s"] = batch / _time(evaluate, dev, repeats, warmup)
    for mode in ("train", "eval"):
        result[f"{mode}_speedup"] = result[f"fast_{mode}_img_s"] / result[f"naive_{mode}_img_s"]
    return result


def main() -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="ViT-B-16", help="open_clip model name, or 'tiny'")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: 1 cpu, 16 cuda)")
    parser.add_argument("--classes", type=int, default=65)
    parser.add_argument("--n-ctx", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: 1 cpu, 5 cuda)")
    parser.add_argument("--threads", type=int, default=None,
                        help="cpu threads (default 1: steady on a shared cpu; 0 = torch's default)")
    args = parser.parse_args()
    on_cpu = args.device == "cpu"
    threads = 1 if args.threads is None and on_cpu else args.threads
    if threads:
        torch.set_num_threads(threads)
    batch = args.batch or (1 if on_cpu else 16)
    repeats = args.repeats or (1 if on_cpu else 5)
    r = measure_text_encoder(args.device, args.model, batch, args.classes, args.n_ctx, repeats)
    print(f"{r['model']} on {r['device']} ({torch.get_num_threads()} threads): batch {batch}, "
          f"{r['classes']} classes, N_CTX {r['n_ctx']}, "
          f"suffix {r['suffix_len']} tokens, median of {repeats}")
    for mode in ("train", "eval"):
        naive, fast, ratio = r[f"naive_{mode}_img_s"], r[f"fast_{mode}_img_s"], r[f"{mode}_speedup"]
        print(f"  {mode:5s}  naive {naive:9.3g} img/s   fast {fast:9.3g} img/s   speedup x{ratio:.1f}")


if __name__ == "__main__":
    main()
