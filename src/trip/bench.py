"""`trip bench`: the fast paths against the official-style ones, as ratios measured in one run (docs/method.md §10).

Each measurement holds the images/s of the fast and of the naive path and ``ratio = fast / naive``:

* ``routing``: batched :func:`trip.routing.route` against the per-image loop of
  :mod:`trip.reference_router` (capacity factor 1.0, the same tokens and k-means inits).
* ``train_step`` (per class count: Office-Home 65, DomainNet 345): one TRIP step, mixture -> prompts ->
  text features -> logits -> CE + KL -> backward -> AdamW. Fast: :meth:`Trip.loss` on cached image
  features with the shared-prefix encoder. Naive, as the official code: the image encoder runs on the
  batch every step, and every image encodes C full 77-token prompts (:func:`encode_prompts_naive`).
* ``eval``: the same forward under ``no_grad``.

The naive text loop costs C times one class, so where ``naive_classes`` < C it is timed on that many
classes and scaled by C / naive_classes (stated in the result). Timings are medians; runs alternate fast
and naive, so a change of load on a shared machine hits both.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor

from trip import routing
from trip.backbone import Backbone, autocast
from trip.config import TripCfg
from trip.data.benchmarks import DOMAINNET_CLASSES, OFFICE_HOME_CLASSES
from trip.errors import TripError
from trip.methods.base import Split
from trip.methods.trip import Trip, distillation_loss
from trip.outputs import check_writable, write_text
from trip.reference_router import reference_route
from trip.textenc import PromptTokens, encode_prompts, encode_prompts_naive
from trip.tinyclip import new_tiny_clip

SEED = 0
CAPACITY_FACTOR = 1.0
# Office-Home domain sizes (docs/method.md §1.1), for the wall-clock estimate of a leave-one-out table.
OFFICE_HOME_SIZES = {"Art": 2427, "Clipart": 4365, "Product": 4439, "Real_World": 4357}
TABLE_ROUNDS = 15
TRAIN_FRACTION = 0.8
CLASS_NAMES = {"office_home": OFFICE_HOME_CLASSES, "domainnet": DOMAINNET_CLASSES}


@dataclass(frozen=True)
class Settings:
    model: str = "ViT-B-16"  # open_clip model name with random weights, or "tiny"
    batch: int = 1  # images per train/eval step
    n_ctx: int = 32
    experts: int = 4
    datasets: tuple[str, ...] = ("office_home", "domainnet")  # their class names (65 and 345)
    naive_classes: int | None = 4  # naive text loop timed on this many classes, then scaled (None: all)
    repeats: int = 3  # timed runs per measurement (median) ...
    budget_s: float = 8.0  # ... fewer once a measurement's runs took this long (at least one)
    route_batch: int = 64
    route_tokens: int = 197
    route_dim: int = 768
    route_naive_images: int = 8  # the per-image loop is timed on this many images, evenly spaced
    route_repeats: int = 7  # routing runs are short: more of them for a steadier median


PRESETS = {
    # CPU: the paper's model, N_CTX and M with one image per step; finishes in about a minute.
    "cpu": Settings(),
    # GPU: the paper's settings (batch 32, N_CTX 32, M 4); the naive loop on 65 classes (memory).
    "cuda": Settings(batch=32, naive_classes=65, repeats=5, budget_s=30.0),
    # A few seconds on CPU (tests).
    "tiny": Settings(model="tiny", batch=2, n_ctx=4, naive_classes=8, repeats=1, route_batch=8,
                     route_tokens=65, route_dim=64, route_naive_images=2, route_repeats=1),
}


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_pair(fast: Callable[[], object], naive: Callable[[], object], device: torch.device, repeats: int,
              budget_s: float) -> tuple[float, float]:
    """Median seconds of fast() and naive(), timed alternately (one warm-up run each on CUDA)."""
    if device.type == "cuda":
        fast(), naive()
    fast_s, naive_s = [], []
    while len(fast_s) < repeats and (not fast_s or sum(fast_s) + sum(naive_s) < budget_s):
        fast_s.append(_seconds(fast, device))
        naive_s.append(_seconds(naive, device))
    return statistics.median(fast_s), statistics.median(naive_s)


def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float) -> float:
    if device.type == "cuda":
        fn()
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        times.append(_seconds(fn, device))
    return statistics.median(times)


def _rates(name: str, fast_ips: float, naive_ips: float, **details: object) -> dict:
    return {"name": name, "fast_images_per_s": fast_ips, "naive_images_per_s": naive_ips,
            "ratio": fast_ips / naive_ips, **details}


# --------------------------------------------------------------------------------------------------
# Routing
# --------------------------------------------------------------------------------------------------


def measure_routing(device: torch.device, s: Settings, block_size: int | None = None) -> dict:
    """Batched router on route_batch images vs the official-style loop on route_naive_images of them."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(s.route_batch, s.route_tokens, s.route_dim, generator=gen).to(device)  # [B, N, D]
    keys = routing.static_keys(s.experts, s.route_dim, seed=SEED).to(device)
    ids = torch.arange(s.route_batch)
    step = max(1, s.route_batch // s.route_naive_images)
    sample = list(range(0, s.route_batch, step))[: s.route_naive_images]
    init = routing.init_indices(ids[sample], s.route_tokens, s.experts, seed=SEED)

    def fast() -> Tensor:
        return routing.route(x, keys, CAPACITY_FACTOR, image_ids=ids, seed=SEED, block_size=block_size)

    def naive() -> list[Tensor]:
        return [reference_route(x[i], keys, CAPACITY_FACTOR, init[j]) for j, i in enumerate(sample)]

    routing.route(x[:2], keys, CAPACITY_FACTOR, image_ids=ids[:2], seed=SEED)  # warm-up
    fast_s, naive_s = time_pair(fast, naive, device, s.route_repeats, s.budget_s)
    agree = sum(torch.equal(f.cpu(), n.cpu()) for f, n in zip(fast()[sample], naive(), strict=True))
    return _rates("routing", s.route_batch / fast_s, len(sample) / naive_s, images=s.route_batch,
                  naive_images=len(sample), tokens=s.route_tokens, dim=s.route_dim, experts=s.experts,
                  capacity_factor=CAPACITY_FACTOR, block_size=block_size,
                  naive_agreement=agree / len(sample))


# --------------------------------------------------------------------------------------------------
# Training step and evaluation
# --------------------------------------------------------------------------------------------------


def build_model(name: str) -> torch.nn.Module:
    """A frozen open_clip CLIP with random weights (nothing is downloaded); "tiny" is trip's test model."""
    if name == "tiny":
        model = new_tiny_clip()
    else:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            model = open_clip.create_model(name, pretrained=None)
    return model.eval().requires_grad_(False)


def _backbone(model_name: str, device: torch.device) -> Backbone:
    model = build_model(model_name).to(device)
    return Backbone(model, open_clip.get_tokenizer("ViT-B-16"), f"{model_name}:random", device)


def _random_teacher(backbone: Backbone, class_names: tuple[str, ...]) -> Tensor:
    """Stands in for the zero-shot teacher, whose 60-template text pass is not what is measured."""
    g = torch.Generator().manual_seed(SEED)
    dim = backbone.model.text_projection.shape[-1]
    return F.normalize(torch.randn(len(class_names), dim, generator=g), dim=-1).to(backbone.device)


def _trip(backbone: Backbone, s: Settings, names: tuple[str, ...]) -> Trip:
    cfg = TripCfg(name="trip", num_experts=s.experts, n_ctx=s.n_ctx, teacher="single")
    return Trip(cfg, backbone, names, teacher=_random_teacher(backbone, names))


def _batch(method: Trip, batch: int, classes: int) -> Split:
    """Cached frozen tensors of a batch: image features, labels, CLS tokens, routing weights."""
    g = torch.Generator().manual_seed(SEED)
    bb = method.backbone
    weights = torch.rand(batch, method.cfg.num_experts, generator=g)
    weights = weights / weights.sum(1, keepdim=True)  # [B, M]
    dim = bb.model.text_projection.shape[-1]
    features = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    labels = torch.randint(classes, (batch,), generator=g)
    cls = torch.randn(batch, bb.vision_width, generator=g)
    inputs = {"features": features, "cls": cls, **{spec.key(): weights for spec in method.inputs().routing}}
    return Split(labels.to(bb.device), {k: v.to(bb.device) for k, v in inputs.items()})


def _naive_logits(method: Trip, params: dict[str, Tensor], feats: Tensor, weights: Tensor,
                  tokens: PromptTokens) -> Tensor:
    """Trip's student logits as the official code computes them: the per-image loop over 77-token prompts."""
    bb = method.backbone
    ctx = torch.einsum("bm,mlw->blw", weights.to(params["experts"].dtype), params["experts"])  # [B, N_CTX, W]
    with autocast(bb.device):
        text = encode_prompts_naive(bb.model, tokens, ctx)  # [B, C', E]
    return bb.logit_scale * torch.einsum("be,bce->bc", feats, F.normalize(text.float(), dim=-1))


def _naive_loss(method: Trip, params: dict[str, Tensor], batch: Split, weights: Tensor, tokens: PromptTokens,
                labels: Tensor) -> Tensor:
    """Trip.loss (CE + soft cross-entropy to the teacher) on the naive logits, over the classes of `tokens`."""
    bb = method.backbone
    student = _naive_logits(method, params, batch.features, weights, tokens)
    teacher = bb.logit_scale * batch.features @ method.teacher[: tokens.num_classes].T
    return distillation_loss(student, teacher, labels, method.cfg.kl_weight)


def _step(loss_fn: Callable[[], Tensor], opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def _no_grad(fn: Callable[[], Tensor]) -> Callable[[], Tensor]:
    def run() -> Tensor:
        with torch.no_grad():
            return fn().argmax(-1)

    return run


def measure_image_encoder(backbone: Backbone, s: Settings) -> float:
    """Seconds of one ViT forward of a batch (the image path the official code runs every step)."""
    size = backbone.image_size
    pixels = torch.randn(s.batch, 3, size, size, generator=torch.Generator().manual_seed(SEED))
    backbone.encode_images(pixels[:1])  # warm-up
    return median_seconds(lambda: backbone.encode_images(pixels), backbone.device, s.repeats, s.budget_s)


def measure_steps(backbone: Backbone, s: Settings, dataset: str, vit_s: float) -> list[dict]:
    """train_step and eval measurements on one data set's classes; vit_s: seconds of the batch's ViT forward."""
    num_classes = len(CLASS_NAMES[dataset])
    method = _trip(backbone, s, CLASS_NAMES[dataset])
    batch = _batch(method, s.batch, num_classes)
    weights = batch[method.route_train.key()]
    params = {k: v.clone().requires_grad_(True) for k, v in method.init_params(SEED).items()}
    opt = torch.optim.AdamW(params.values(), lr=5e-4, betas=(0.9, 0.98), eps=1e-7, weight_decay=0.01)
    k = min(num_classes, s.naive_classes or num_classes)
    t = method.tokens
    tokens = PromptTokens(t.prefix[:k], t.suffix[:k], t.eot[:k], t.n_ctx)
    labels = batch.labels % k

    train = (_step(lambda: method.loss(params, batch), opt),
             _step(lambda: _naive_loss(method, params, batch, weights, tokens, labels), opt))
    evaluate = (_no_grad(lambda: method.logits(params, batch)),
                _no_grad(lambda: _naive_logits(method, params, batch.features, weights, tokens)))
    _warm_up(method, params)
    out = []
    for name, (fast, naive) in (("train_step", train), ("eval", evaluate)):
        fast_s, naive_text_s = time_pair(fast, naive, backbone.device, s.repeats, s.budget_s)
        naive_s = vit_s + naive_text_s * num_classes / k
        out.append(_rates(name, s.batch / fast_s, s.batch / naive_s, dataset=dataset, classes=num_classes,
                          naive_timed_classes=k, naive_image_encoder_s=vit_s))
    return out


def _warm_up(method: Trip, params: dict[str, Tensor]) -> None:
    """One small step of each path (two classes, one image): kernels and allocator, not the timings."""
    t = method.tokens
    small = PromptTokens(t.prefix[:2], t.suffix[:2], t.eot[:2], t.n_ctx)
    ctx = params["experts"][:1].detach().clone().requires_grad_(True)
    for encode in (encode_prompts, encode_prompts_naive):
        encode(method.backbone.model, small, ctx).float().sum().backward()


# --------------------------------------------------------------------------------------------------
# Whole run
# --------------------------------------------------------------------------------------------------


def table_estimate(train: dict, evaluate: dict, route: dict, vit_images_per_s: float) -> dict:
    """Wall-clock hours of an Office-Home leave-one-out TRIP table at the measured rates.

    Per target: 15 rounds; each round one local epoch on 80 % of every source domain, then validation on
    the other 20 % and test on the target, each for the server and the BMA model. Once: routing of every
    image twice (train and inference capacity) and one image-encoder pass over them."""
    total = sum(OFFICE_HOME_SIZES.values())
    train_images = eval_images = 0.0
    for target in OFFICE_HOME_SIZES.values():
        sources = total - target
        train_images += TABLE_ROUNDS * TRAIN_FRACTION * sources
        eval_images += TABLE_ROUNDS * 2 * ((1 - TRAIN_FRACTION) * sources + target)
    hours = {}
    for path in ("fast", "naive"):
        seconds = (train_images / train[f"{path}_images_per_s"] + eval_images / evaluate[f"{path}_images_per_s"]
                   + 2 * total / route[f"{path}_images_per_s"] + total / vit_images_per_s)
        hours[f"{path}_hours"] = seconds / 3600
    return {**hours, "ratio": hours["naive_hours"] / hours["fast_hours"], "train_images": train_images,
            "eval_images": eval_images, "routed_images": 2 * total, "encoded_images": total,
            "image_encoder_images_per_s": vit_images_per_s}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} logical CPUs)"


def run(device: torch.device, s: Settings, threads: int | None = 1) -> dict:
    """Every measurement on one device. threads: torch CPU threads during the run (None: leave as is)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    try:
        measurements = [measure_routing(device, s)]
        backbone = _backbone(s.model, device)
        vit_s = measure_image_encoder(backbone, s)
        for dataset in s.datasets:
            measurements += measure_steps(backbone, s, dataset, vit_s)
        threads_used = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    first = {m["name"]: m for m in reversed(measurements)}  # the first data set's (Office-Home) rates
    return {
        "device": device.type, "device_name": device_name(device), "torch": torch.__version__,
        "threads": threads_used, "settings": asdict(s), "seconds": time.perf_counter() - start,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "measurements": measurements,
        "office_home_table": table_estimate(first["train_step"], first["eval"], first["routing"], s.batch / vit_s),
    }


def format_report(result: dict) -> str:
    lines = [f"{result['device_name']} ({result['device']}, {result['threads']} thread(s), torch "
             f"{result['torch']}); load average {result['load_average']['before'][0]:.2f} -> "
             f"{result['load_average']['after'][0]:.2f}; {result['seconds']:.0f} s",
             f"{'measurement':34s} {'fast img/s':>12s} {'naive img/s':>12s} {'ratio':>8s}"]
    for m in result["measurements"]:
        label = m["name"] + (f" ({m['dataset']}, {m['classes']} cl.)" if "dataset" in m else "")
        lines.append(f"{label:34s} {m['fast_images_per_s']:12.4g} {m['naive_images_per_s']:12.4g} "
                     f"{m['ratio']:7.1f}x")
    t = result["office_home_table"]
    lines.append(f"Office-Home leave-one-out TRIP table (4 targets x {TABLE_ROUNDS} rounds), estimated from "
                 f"these rates: fast {_hours(t['fast_hours'])}, naive {_hours(t['naive_hours'])} "
                 f"({t['ratio']:.1f}x)")
    return "\n".join(lines)


def _hours(h: float) -> str:
    return f"{h:.1f} h" if h >= 1 else f"{h * 60:.1f} min"


def main(device: str | None, out: Path | None, *, tiny: bool = False, threads: int | None = 1) -> int:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TripError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    if out is not None:  # before the measurements: an unwritable --out costs nothing
        check_writable(out, "--out", "bench.json")
    settings = PRESETS["tiny" if tiny else dev.type]
    result = run(dev, settings, threads=threads if dev.type == "cpu" else None)
    print(format_report(result))
    if out is not None:
        write_text(out, json.dumps(result, indent=2) + "\n", "--out", "bench.json")
        print(f"written: {out}")
    return 0
