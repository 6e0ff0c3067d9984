"""Pictures: the routing map of an image (`trip viz routing`) and the figures of a run folder.

Every figure uses one colour-blind-safe palette (Okabe–Ito); expert e is always `expert_color(e)`.
Figures are matplotlib `Figure` objects drawn on the Agg canvas: no pyplot, no global state.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor

from trip import routing
from trip.backbone import Backbone, load_backbone, load_image, resolve_device
from trip.config import ALL_DOMAINS, ExperimentCfg, TripCfg
from trip.data.datasets import DatasetSpec, get_dataset
from trip.errors import TripError
from trip.expert_usage import EXPERT_USAGE_FILE
from trip.features import image_id
from trip.results import round_records

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")
_SERIES_ORDER = (4, 5, 2, 6, 0, 1, 7, 3)  # lines on white: strong colours first, yellow last
DROPPED_COLOR = "#BBBBBB"
DROPPED_HATCH = "////"
FIGURES_DIR = "figures"
DPI = 130


def expert_color(expert: int) -> str:
    """The colour of expert `expert` (0-based) in every figure; black is left for text and outlines."""
    return OKABE_ITO[expert % 7]


def series_color(index: int) -> str:
    """The colour of the index-th line (method, client) of a plot."""
    return OKABE_ITO[_SERIES_ORDER[index % len(_SERIES_ORDER)]]


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, facecolor="white")
    return path


# --------------------------------------------------------------------------- routing maps of single images


@dataclass(frozen=True)
class RoutingMap:
    """One image's routing at one capacity factor, token by token, as `routing.route` computes it."""

    phase: str  # "train" or "inference"
    capacity: float | None  # None: plain k-means
    experts: Tensor  # [N] expert of each token (CLS first, then the grid row by row); -1 = dropped
    weights: Tensor  # [M] mixture weights

    @property
    def grid(self) -> int:
        return round((len(self.experts) - 1) ** 0.5)


def token_experts(tokens: Tensor, keys: Tensor, capacity: float | None, *, image_ids: Tensor, seed: int,
                  run: str = "train", assignment: str = "hungarian", max_iters: int = 100) -> tuple[Tensor, Tensor]:
    """tokens [B, N, D] -> (expert of each token [B, N], -1 where dropped; mixture weights [B, M]): the
    router itself (`routing.route_tokens`), so the map shows exactly where the cached weights come from."""
    result = routing.route_tokens(tokens, keys, capacity, image_ids=image_ids, seed=seed, run=run,
                                  assignment=assignment, max_iters=max_iters)
    return result.token_experts, result.weights


def routing_method(cfg: ExperimentCfg) -> TripCfg:
    """The config's first trip / trip-lite method with the token router: it gives M, capacities, seeds."""
    for method in cfg.methods:
        if isinstance(method, TripCfg) and method.routing == "token":
            return method
    raise TripError("the config has no trip or trip-lite method with routing: token, so there is no token "
                    "router to draw; add one to `methods`")


def image_key(path: Path, spec: DatasetSpec) -> str:
    """The string whose `features.image_id` seeds an image's k-means init.

    An image inside a `<domain>/<class>/` folder of the config's data set gets its path relative to the data
    root (`<domain>/<class>/<file>`), exactly as the frozen cache, so its map matches the cached weights.
    Any other image file gets its file name."""
    parts = path.absolute().parts
    aliases = {alias: d for d, names in spec.domain_aliases.items() for alias in names}
    if len(parts) >= 3:
        domain = aliases.get(parts[-3], parts[-3])
        if domain in spec.domains and parts[-2] in spec.classes:
            return f"{domain}/{parts[-2]}/{parts[-1]}"
    return path.name


@torch.no_grad()
def routing_maps(backbone: Backbone, image: Image.Image, key: str, method: TripCfg) -> list[RoutingMap]:
    """The image's routing at the method's train and inference capacity factors."""
    _, tokens = backbone.encode_images(backbone.transform()(image).unsqueeze(0))  # [1, N, Dv]
    keys = routing.static_keys(method.num_experts, backbone.vision_width, method.key_seed).to(tokens.device)
    ids = torch.tensor([image_id(key)], dtype=torch.int64)
    maps = []
    for phase, run, capacity in (("train", "train", method.capacity_train),
                                 ("inference", "infer", method.capacity_infer)):
        experts, weights = token_experts(tokens, keys, capacity, image_ids=ids, seed=method.key_seed, run=run,
                                         assignment=method.assignment, max_iters=method.kmeans_iters)
        maps.append(RoutingMap(phase, capacity, experts[0].cpu(), weights[0].cpu()))
    return maps


def write_routing_maps(images: list[Path], cfg: ExperimentCfg, out: Path) -> list[Path]:
    """One PNG per image file in `out`: the image, its token map and mixture weights (train | inference)."""
    method = routing_method(cfg)
    spec = get_dataset(cfg.data.name)
    backbone = load_backbone(cfg.backbone, resolve_device(cfg.device))
    names = _map_names(images)
    written = []
    for path, name in zip(images, names):
        try:
            image = load_image(path)
        except OSError as err:
            raise TripError(f"cannot read image {path}: {err}") from None
        except Image.DecompressionBombError as err:
            raise TripError(f"image {path} is too large to open safely ({err}): scale it down, e.g. to 1024 "
                            f"pixels on its longer side, and pass the smaller copy") from None
        key = image_key(path, spec)
        title = (f"{path.name}: token routing, {method.num_experts} experts, key seed {method.key_seed}, "
                 f"backbone {cfg.backbone.name} (k-means init seeded by id '{key}')")
        fig = routing_figure(image, routing_maps(backbone, image, key, method), title)
        written.append(_save(fig, out / f"{name}-routing.png"))
    return written


def _map_names(images: list[Path]) -> list[str]:
    """File stems; where two stems are the same, the stem with its two parent folders (`domain_class_stem`)."""
    stems = [p.stem for p in images]
    return [s if stems.count(s) == 1 else "_".join([*p.absolute().parent.parts[-2:], s])
            for s, p in zip(stems, images)]


def routing_figure(image: Image.Image, maps: list[RoutingMap], title: str) -> Figure:
    side = min(image.size)  # the centre square: the region the CLIP transform (resize, centre crop) sees
    left, top = (image.width - side) // 2, (image.height - side) // 2
    crop = np.asarray(image.crop((left, top, left + side, top + side)).convert("RGB"))
    num_experts = len(maps[0].weights)
    fig = Figure(figsize=(4.0 * (len(maps) + 1), 5.6), layout="constrained")
    grid = fig.add_gridspec(2, len(maps) + 1, height_ratios=(3.4, 1.3))
    ax = fig.add_subplot(grid[0, 0])
    ax.imshow(crop, extent=(0, 1, 1, 0))
    ax.set_title("input (centre square the model sees)")
    ax.set_axis_off()
    _expert_legend(fig.add_subplot(grid[1, 0]), num_experts)
    for col, rmap in enumerate(maps, start=1):
        _draw_token_map(fig.add_subplot(grid[0, col]), crop, rmap)
        _draw_weights(fig.add_subplot(grid[1, col]), rmap.weights)
    fig.suptitle(title, fontsize=10)
    return fig


def _capacity_text(capacity: float | None) -> str:
    return "plain k-means (no capacity)" if capacity is None else f"capacity factor α = {capacity:g}"


def _draw_token_map(ax: Axes, crop: np.ndarray, rmap: RoutingMap) -> None:
    g, n = rmap.grid, len(rmap.experts)
    cells = rmap.experts[1:].reshape(g, g).numpy()
    colours = np.array([to_rgba(expert_color(e), 0.6) for e in range(len(rmap.weights))])
    overlay = np.zeros((g, g, 4))
    overlay[cells >= 0] = colours[cells[cells >= 0]]
    # A light grey copy of the image under the overlay keeps the expert colours true while showing structure.
    grey = 110 + 0.55 * (crop[..., :3] @ np.array([0.299, 0.587, 0.114]))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, extent=(0, g, g, 0))
    ax.imshow(overlay, extent=(0, g, g, 0), interpolation="nearest")
    for r, c in zip(*np.nonzero(cells < 0)):
        ax.add_patch(Rectangle((c, r), 1, 1, facecolor=to_rgba(DROPPED_COLOR, 0.75), edgecolor="#444444",
                               hatch=DROPPED_HATCH, linewidth=0))
    for k in range(g + 1):
        ax.axhline(k, color="white", linewidth=0.4)
        ax.axvline(k, color="white", linewidth=0.4)
    kept = int((rmap.experts >= 0).sum())
    cls = int(rmap.experts[0])
    cls_text = "CLS dropped" if cls < 0 else f"CLS → E{cls + 1}"
    ax.set_title(f"{rmap.phase}: {_capacity_text(rmap.capacity)}\n{kept} of {n} tokens kept; {cls_text}",
                 fontsize=10)
    ax.set_xlabel(f"{g}×{g} patch tokens (+ CLS)")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_weights(ax: Axes, weights: Tensor) -> None:
    m = len(weights)
    bars = ax.bar(range(m), weights.tolist(), color=[expert_color(e) for e in range(m)], edgecolor="black",
                  linewidth=0.6)
    ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=1)
    ax.set_xticks(range(m), [f"E{e + 1}" for e in range(m)])
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("mixture weight\n(share of kept tokens)", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def _expert_legend(ax: Axes, num_experts: int) -> None:
    handles = [Patch(facecolor=expert_color(e), edgecolor="black", label=f"expert E{e + 1}")
               for e in range(num_experts)]
    handles.append(Patch(facecolor=DROPPED_COLOR, edgecolor="#444444", hatch=DROPPED_HATCH,
                         label="dropped token (over capacity)"))
    ax.legend(handles=handles, loc="center", ncol=1 if num_experts <= 4 else 2, frameon=False, fontsize=9)
    ax.set_axis_off()


# --------------------------------------------------------------------------- expert usage (written by a run)


# --------------------------------------------------------------------------- figures of a run folder


@dataclass
class RunFiles:
    """What the figures read from a run folder."""

    results: dict
    rounds: list[dict]
    usage: dict | None

    @classmethod
    def read(cls, run_dir: Path) -> RunFiles:
        results_path = run_dir / "results.json"
        if not results_path.is_file():
            raise TripError(f"{run_dir} is not a run folder (no results.json): pass the --out folder of "
                            f"`trip run` or `trip demo`")
        usage_path = run_dir / EXPERT_USAGE_FILE
        usage = read_json(usage_path) if usage_path.is_file() else None
        return cls(read_json(results_path), round_records(run_dir), usage)

    @property
    def name(self) -> str:
        return self.results.get("experiment", "run")


def read_json(path: Path):
    try:
        return json.loads(path.read_bytes())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise TripError(f"{path} is damaged ({type(err).__name__}: {err}): restore it, or leave its run folder "
                        f"out") from None


def write_run_figures(out_dir: Path) -> list[Path]:
    """Draw the figures of a run folder into `<out_dir>/figures/` from its files alone (results.json,
    rounds.jsonl, and expert_usage.json where present); returns the PNGs written."""
    return draw_run_figures(RunFiles.read(Path(out_dir)), Path(out_dir) / FIGURES_DIR)


def draw_run_figures(run: RunFiles, dest: Path) -> list[Path]:
    drawers: dict[str, Callable[[RunFiles], Figure | None]] = {
        "accuracy.png": accuracy_figure, "train_loss.png": train_loss_figure,
        "expert_usage.png": expert_usage_figure, "communication.png": communication_figure,
        "base2novel.png": base2novel_figure,
    }
    written = []
    for name, draw in drawers.items():
        fig = draw(run)
        if fig is not None:
            written.append(_save(fig, dest / name))
    return written


def _ordered(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _mean_by_round(records: list[dict], pick: Callable[[dict], float | None]) -> tuple[list[int], list[float]]:
    """Rounds (1-based) and the mean over seeds of pick(record) in each; records where pick is None skipped."""
    by_round: dict[int, list[float]] = {}
    for r in records:
        value = pick(r)
        if value is not None:
            by_round.setdefault(r["round"] + 1, []).append(value)
    rounds = sorted(by_round)
    return rounds, [statistics.fmean(by_round[x]) for x in rounds]


def _panel_grid(rows: int, cols: int, title: str, height: float = 2.6) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(6.0, 3.3 * cols), 0.9 + height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey="row")
    fig.suptitle(title)
    return fig, axes


def _shared_legend(fig: Figure, axes: np.ndarray, order: list[str] | None = None) -> None:
    """One legend below the panels: each label once, in `order` where given, else as first drawn."""
    handles: dict[str, object] = {}
    for ax in axes.flat:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if order:
        handles = {k: handles[k] for k in order if k in handles}
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(4, len(handles)), frameon=False)


ACCURACY_ROWS = (("target", "held-out target\naccuracy (%)"), ("val_mean", "mean source-val\naccuracy (%)"))
BASE2NOVEL_ROWS = (("target_base", "held-out target\nbase classes (%)"),
                   ("target_novel", "held-out target\nnovel classes (%)"),
                   ("target", "held-out target\nHM base/novel (%)"),
                   ("val_mean", "mean source-val\nbase classes (%)"))


def accuracy_figure(run: RunFiles) -> Figure | None:
    """Held-out target and mean source-validation accuracy per round; server solid, BMA dashed; a method that
    does not train is a dotted level."""
    if not run.rounds:
        return None
    targets, methods = _ordered(r["target"] for r in run.rounds), _ordered(r["method"] for r in run.rounds)
    parts = any("target_base" in ev for r in run.rounds for ev in r["eval"].values())
    tested = "mean in-domain test" if targets == [ALL_DOMAINS] else "held-out target"
    rows = BASE2NOVEL_ROWS if parts else (("target", f"{tested}\naccuracy (%)"), ACCURACY_ROWS[1])
    fig, axes = _panel_grid(len(rows), len(targets), f"{run.name}: accuracy per round (mean over seeds)")
    for j, target in enumerate(targets):
        for i, (field, ylabel) in enumerate(rows):
            ax = axes[i, j]
            for k, method in enumerate(methods):
                mine = [r for r in run.rounds if r["method"] == method and r["target"] == target]
                _plot_accuracy(ax, mine, field, method, series_color(k))
            ax.set_title(_tested_on(target) if i == 0 else "")
            ax.set_ylabel(ylabel if j == 0 else "")
            ax.grid(alpha=0.3)
        axes[-1, j].set_xlabel("communication round")
        axes[-1, j].xaxis.set_major_locator(MaxNLocator(integer=True))
    _shared_legend(fig, axes)
    return fig


def _tested_on(target: str) -> str:
    """A panel's title: its held-out domain, or (multidomain) that every domain is tested on its own split."""
    return "every domain, in-domain" if target == ALL_DOMAINS else f"held out: {target}"


def _plot_accuracy(ax: Axes, records: list[dict], field: str, method: str, colour: str) -> None:
    if records and all("train_loss" not in r for r in records):
        values = [v for r in records if (v := r["eval"]["server"][field]) is not None]  # null: an empty split
        if values:
            ax.axhline(statistics.fmean(values), color=colour, linestyle=":", linewidth=1.6,
                       label=f"{method} (no training)")
        return
    for model, style in (("server", "-"), ("bma", "--")):
        xs, ys = _mean_by_round(records, lambda r, m=model: r["eval"].get(m, {}).get(field))
        if xs:
            ax.plot(xs, ys, linestyle=style, marker="o", markersize=3, color=colour,
                    label=f"{method} ({'BMA' if model == 'bma' else 'server'} model)")


def train_loss_figure(run: RunFiles) -> Figure | None:
    """Mean local training loss of each client per round: a row per trained method, a column per target."""
    trained = [r for r in run.rounds if "train_loss" in r]
    if not trained:
        return None
    targets, methods = _ordered(r["target"] for r in trained), _ordered(r["method"] for r in trained)
    seen = {c for r in trained for c in r["train_loss"]}
    clients = [c for c in _ordered([*targets, *(c for r in trained for c in r["train_loss"])]) if c in seen]
    fig, axes = _panel_grid(len(methods), len(targets), f"{run.name}: local training loss per client "
                            "(mean over the round's steps and over seeds)", height=2.3)
    for i, method in enumerate(methods):
        for j, target in enumerate(targets):
            ax = axes[i, j]
            mine = [r for r in trained if r["method"] == method and r["target"] == target]
            for k, client in enumerate(clients):
                xs, ys = _mean_by_round(mine, lambda r, c=client: r["train_loss"].get(c))
                if xs:
                    ax.plot(xs, ys, marker="o", markersize=3, color=series_color(k), label=f"client {client}")
            ax.set_title(f"{method}, {_tested_on(target)}", fontsize=10)
            ax.set_ylabel("training loss (nats)" if j == 0 else "")
            ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("communication round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _shared_legend(fig, axes, [f"client {c}" for c in clients])
    return fig


def expert_usage_figure(run: RunFiles) -> Figure | None:
    """Per method and routing phase: mean mixture weight and argmax share of each expert, stacked per domain (a
    domain where the router collapsed is marked), and the experts' redundancy per domain (docs/figures.md
    "Router diagnostics")."""
    methods = (run.usage or {}).get("methods", {})
    if not methods:
        return None
    rows = [(label, phase, info) for label, m in methods.items() for phase, info in m["phases"].items()]
    fig = Figure(figsize=(14, 0.9 + 2.5 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False, width_ratios=(1, 1, 0.6))
    fig.suptitle(f"{run.name}: expert usage per domain (all images of the domain, cached router weights)")
    for i, (label, phase, info) in enumerate(rows):
        for j, (field, what) in enumerate((("mean_weight", "mean mixture weight (fraction)"),
                                           ("argmax_share", "share of images whose top expert it is"))):
            _stacked_usage(axes[i, j], info["domains"], field)
            phase_name = "inference" if phase == "infer" else phase
            axes[i, j].set_title(f"{label}, {phase_name} routing ({_capacity_text(info['capacity'])})",
                                 fontsize=10)
            axes[i, j].set_xlabel(what)
        _redundancy(axes[i, 2], info["domains"])
    most = max(m["num_experts"] for m in methods.values())
    fig.legend(handles=[Patch(facecolor=expert_color(e), edgecolor="black", label=f"expert E{e + 1}")
                        for e in range(most)], loc="outside lower center", ncol=min(8, most), frameon=False)
    return fig


def _stacked_usage(ax: Axes, domains: dict[str, dict], field: str) -> None:
    names = list(domains)
    left = np.zeros(len(names))
    values = np.array([domains[d][field] for d in names])  # [domains, M]
    for e in range(values.shape[1]):
        bars = ax.barh(names, values[:, e], left=left, color=expert_color(e), edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, labels=[f"{v:.2f}" if v >= 0.08 else "" for v in values[:, e]], label_type="center",
                     fontsize=7)
        left += values[:, e]
    ax.set_xlim(0, 1)
    ax.set_yticks(range(len(names)), [f"{d}\n(collapsed)" if domains[d].get("collapsed") else d for d in names])
    ax.invert_yaxis()
    ax.set_ylabel("domain")


def _redundancy(ax: Axes, domains: dict[str, dict]) -> None:
    """The mean pairwise overlap of the experts' token shares per domain (none for one expert, or in a run folder
    written before it was measured)."""
    names = list(domains)
    values = [domains[d].get("redundancy") for d in names]
    bars = ax.barh(names, [v or 0.0 for v in values], color="0.6", edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, labels=["—" if v is None else f"{v:.2f}" for v in values], padding=2, fontsize=7)
    ax.set_xlim(0, 1.15)
    ax.invert_yaxis()
    ax.set_title("expert redundancy", fontsize=10)
    ax.set_xlabel("mean pairwise overlap")


def base2novel_figure(run: RunFiles) -> Figure | None:
    """Base, novel and HM accuracy of each method (base2novel runs only): the mean over held-out domains, bars at
    the mean over seeds, whiskers ± the std over seeds."""
    runs = [r for r in run.results.get("runs", []) if r.get("acc_hm") is not None]
    if not runs:
        return None
    methods = _ordered(r["method"] for r in runs)
    fig = Figure(figsize=(max(6.0, 1.6 * len(methods) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    fig.suptitle(f"{run.name}: base-to-novel accuracy (mean over held-out domains; ± std over seeds)")
    width = 0.8 / 3
    for i, (key, label) in enumerate((("acc_base", "base"), ("acc_novel", "novel"), ("acc_hm", "HM"))):
        per_seed = [[statistics.fmean(r[key] for r in runs if r["method"] == m and r["seed"] == s)
                     for s in _ordered(r["seed"] for r in runs if r["method"] == m)] for m in methods]
        ax.bar(np.arange(len(methods)) + (i - 1) * width, [statistics.fmean(v) for v in per_seed], width,
               yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in per_seed], capsize=3, label=label,
               color=series_color(i), edgecolor="black", linewidth=0.6)
    ax.set_xticks(np.arange(len(methods)), methods)
    ax.set_ylabel("held-out target accuracy (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(frameon=False, ncol=3)
    return fig


def _byte_unit(largest: float) -> tuple[float, str]:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= scale:
            return scale, unit
    return 1.0, "B"


def communication_figure(run: RunFiles) -> Figure | None:
    """Bytes one client uploads per round (fp32 tensors), and the cumulative traffic of the federation."""
    runs = run.results.get("runs", [])
    if not runs:
        return None
    methods = _ordered(r["method"] for r in runs)
    per_round = {m: next(r["comm_bytes_per_round"] for r in runs if r["method"] == m) for m in methods}
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    bar_ax, cum_ax = fig.subplots(1, 2)
    fig.suptitle(f"{run.name}: communication per round")
    scale, unit = _byte_unit(max(per_round.values()))
    bars = bar_ax.bar(methods, [per_round[m] / scale for m in methods],
                      color=[series_color(k) for k in range(len(methods))], edgecolor="black", linewidth=0.6)
    params = {m: next(r["comm_params_per_round"] for r in runs if r["method"] == m) for m in methods}
    bar_ax.bar_label(bars, labels=[f"{params[m]:,} params" for m in methods], fontsize=8, padding=2)
    bar_ax.set_ylabel(f"upload per client per round ({unit})")
    bar_ax.set_xlabel("method")
    bar_ax.set_title("one client's upload per round (the download is the same)", fontsize=10)
    bar_ax.margins(y=0.15)
    _cumulative_traffic(cum_ax, run.rounds, per_round)
    return fig


def _cumulative_traffic(ax: Axes, rounds: list[dict], per_round: dict[str, int]) -> None:
    """Both directions, all participating clients, mean over (target, seed) runs."""
    curves = {}
    for m, size in per_round.items():
        xs, ys = _mean_by_round([r for r in rounds if r["method"] == m and "participants" in r],
                                lambda r, s=size: 2 * s * len(r["participants"]))
        if xs and size:
            curves[m] = (xs, np.cumsum(ys))
    scale, unit = _byte_unit(max((c[1][-1] for c in curves.values()), default=0))
    for k, m in enumerate(per_round):
        if m in curves:
            ax.plot(curves[m][0], curves[m][1] / scale, marker="o", markersize=3, color=series_color(k), label=m)
    ax.set_xlabel("communication round")
    ax.set_ylabel(f"cumulative traffic ({unit})")
    ax.set_title("all clients, upload + download", fontsize=10)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(frameon=False)
