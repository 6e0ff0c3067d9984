"""Target accuracy of TRIP, PromptFL and FedOTP as the federation grows (K clients per domain) and as the
label skew grows (Dirichlet alpha shrinks), on the demo's synthetic data and tiny CLIP.

    python benchmarks/federation_scaling.py [--out DIR] [--seeds 0,1] [--settings NAME,...] [--quick]

Each (setting, seed) is one `trip.experiment.run_experiment` of the demo's config (src/trip/configs/demo.yaml,
its zero-shot, PromptFL, TRIP and FedOTP) with a `federation` section, in its own run folder under DIR
(default runs/federation-scaling): a rerun continues where it stopped. Settings: K = 1, 5, 20 with an iid split,
then K = 5 with Dirichlet alpha = 1, 0.3, 0.1. Every domain is held out in turn. Writes DIR/federation_scaling.json
(per setting and method: the selected round's target accuracy, the mean over held-out domains, mean ± std over
seeds), DIR/federation_scaling.png and prints the Markdown table of docs/federation.md "Scaling". --settings runs
a subset (names as K5-iid, K5-dirichlet0.3): several such processes may share DIR, and a last one with --no-run
(only reads the run folders) writes the JSON and figure of every setting.
--quick (a smoke test): seed 0, one held-out domain, one round, 12 images per class, K = 1 and 5 (iid and alpha 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from importlib import resources
from pathlib import Path

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trip.config import parse_config
from trip.experiment import run_experiment
from trip.results import strict_json
from trip.viz import series_color

METHODS = ("zeroshot", "promptfl", "trip", "fedotp")
TRAINED = METHODS[1:]
SIZE_LADDER = [{"clients_per_domain": k, "partition": "iid"} for k in (1, 5, 20)]
# K = 5: the demo's 240 images per domain cannot be dealt to 20 clients of at least 5 images at alpha <= 0.3
SKEW_LADDER = [{"clients_per_domain": 5, "partition": "dirichlet", "dirichlet_alpha": a} for a in (1.0, 0.3, 0.1)]
QUICK_SETTINGS = [SIZE_LADDER[0], SIZE_LADDER[1], SKEW_LADDER[0]]
QUICK_OVERRIDES = {"rounds": 1, "images_per_class": 12, "targets": ["photo"]}
RESULTS_FILE = "federation_scaling.json"
FIGURE_FILE = "federation_scaling.png"


def setting_name(fed: dict) -> str:
    if fed["partition"] == "iid":
        return f"K{fed['clients_per_domain']}-iid"
    return f"K{fed['clients_per_domain']}-dirichlet{fed['dirichlet_alpha']:g}"


def demo_config(fed: dict, seed: int, quick: bool) -> dict:
    raw = yaml.safe_load((resources.files("trip") / "configs" / "demo.yaml").read_text())
    raw["name"] = f"federation scaling {setting_name(fed)}"
    raw["seeds"] = [seed]
    raw["device"] = "cpu"
    raw["methods"] = [m for m in raw["methods"] if m["name"] in METHODS]
    raw["federation"] = dict(fed)
    if quick:
        raw["train"]["rounds"] = QUICK_OVERRIDES["rounds"]
        raw["data"]["images_per_class"] = QUICK_OVERRIDES["images_per_class"]
        raw["data"]["targets"] = QUICK_OVERRIDES["targets"]
    return raw


def run_sweep(out: Path, settings: list[dict], seeds: list[int], quick: bool) -> None:
    """Seed-major, so that an interrupted sweep has every setting at the first seed."""
    for seed in seeds:
        for fed in settings:
            folder = out / setting_name(fed) / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            run_experiment(parse_config(demo_config(fed, seed, quick)), folder)
            print(f"{setting_name(fed)} seed {seed} done (load {os.getloadavg()[0]:.1f})", flush=True)


def label_skew(clients_file: Path) -> dict[str, float]:
    """How skewed the clients are: the mean number of classes a client holds and the mean share of its largest
    class (1/6 for a balanced client of the six synthetic classes), from the image paths <domain>/<class>/<file>."""
    classes_held, largest_share = [], []
    for clients in json.loads(clients_file.read_text()).values():
        for client in clients.values():
            classes = [Path(p).parts[-2] for p in client["train"] + client["val"]]
            counts = [classes.count(c) for c in set(classes)]
            classes_held.append(len(counts))
            largest_share.append(max(counts) / len(classes))
    return {"classes_per_client": statistics.mean(classes_held),
            "largest_class_share": statistics.mean(largest_share)}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def summarise(out: Path, settings: list[dict], seeds: list[int]) -> list[dict]:
    """Per setting and method: the target accuracy at the selected round, averaged over the held-out domains per
    seed, then mean ± std over seeds; beside it the per-domain means and the selected rounds."""
    rows = []
    for fed in settings:
        folders = [out / setting_name(fed) / f"seed{seed}" for seed in seeds]
        runs = [r for f in folders for r in json.loads((f / "results.json").read_text())["runs"]]
        skew = [label_skew(f / "clients.json") for f in folders]
        for method in METHODS:
            mine = [r for r in runs if r["method"] == method]
            per_seed = [statistics.mean(r["acc"] for r in mine if r["seed"] == s) for s in seeds]
            targets = sorted({r["target"] for r in mine})
            rows.append({"setting": setting_name(fed), **fed, "method": method, "acc": mean_std(per_seed),
                         "acc_per_seed": per_seed,
                         "acc_per_target": {t: statistics.mean(r["acc"] for r in mine if r["target"] == t)
                                            for t in targets},
                         "selected_rounds": [r["selected_round"] for r in mine],
                         "time_s_per_run": statistics.mean(r["time_s"] for r in mine),
                         **{k: statistics.mean(s[k] for s in skew) for k in skew[0]}})
    return rows


def machine(load_start: float) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "load_average_start": load_start, "load_average_end": os.getloadavg()[0]}


def markdown_table(rows: list[dict]) -> str:
    def cell(acc: dict) -> str:
        return f"{acc['mean']:.1f}" + (f" ± {acc['std']:.1f}" if acc["std"] is not None else "")

    lines = ["| setting | classes / client | largest class share | " + " | ".join(METHODS) + " |",
             "|---|---|---|" + "---|" * len(METHODS)]
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = {r["method"]: r for r in rows if r["setting"] == name}
        first = next(iter(mine.values()))
        lines.append(f"| {name} | {first['classes_per_client']:.1f} | {first['largest_class_share']:.2f} | "
                     + " | ".join(cell(mine[m]["acc"]) for m in METHODS) + " |")
    return "\n".join(lines)


def draw(rows: list[dict], path: Path) -> None:
    """Left: accuracy against K (iid); right: against alpha at K = 5 (iid as alpha = inf, the leftmost point).
    Zero-shot (no training, the same in every setting) is the dashed reference line."""
    fig = Figure(figsize=(9, 3.6))
    size_ax, skew_ax = fig.subplots(1, 2, sharey=True)
    panels = [(size_ax, [r for r in rows if r["partition"] == "iid"], "clients per domain K (iid)"),
              (skew_ax, [r for r in rows if r["clients_per_domain"] == 5], "Dirichlet alpha at K = 5")]
    for ax, mine, xlabel in panels:
        if not mine:
            continue
        legend_ax = ax
        names = list(dict.fromkeys(r["setting"] for r in mine))
        ticks = [_tick(next(r for r in mine if r["setting"] == n), ax is size_ax) for n in names]
        for i, method in enumerate(TRAINED):
            acc = [next(r["acc"] for r in mine if r["setting"] == n and r["method"] == method) for n in names]
            ax.errorbar(range(len(names)), [a["mean"] for a in acc], yerr=[a["std"] or 0 for a in acc], marker="o",
                        capsize=3, color=series_color(i), label=method)
        zeroshot = statistics.mean(r["acc"]["mean"] for r in mine if r["method"] == "zeroshot")
        ax.axhline(zeroshot, color="black", linestyle="--", linewidth=1, label="zeroshot")
        ax.set_xticks(range(len(names)), ticks)
        ax.set_xlabel(xlabel)
    size_ax.set_ylabel("target accuracy (%)")
    fig.suptitle("selected round, mean over held-out domains; ± std over seeds", fontsize=9)
    legend_ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, facecolor="white")


def _tick(row: dict, by_size: bool) -> str:
    if by_size:
        return str(row["clients_per_domain"])
    return "iid" if row["partition"] == "iid" else f"{row['dirichlet_alpha']:g}"


def chosen_settings(settings: list[dict], names: str) -> list[dict]:
    if not names:
        return settings
    known = {setting_name(fed): fed for fed in settings}
    unknown = [n for n in names.split(",") if n not in known]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: choose from {', '.join(known)}")
    return [known[n] for n in names.split(",")]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/federation-scaling"))
    ap.add_argument("--seeds", default="0,1", help="comma-separated run seeds")
    ap.add_argument("--settings", default="", help="comma-separated setting names (default: all)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: see the module's docstring")
    ap.add_argument("--no-run", action="store_true", help="only summarise the run folders already in --out")
    a = ap.parse_args(argv)
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",")]
    settings = chosen_settings(QUICK_SETTINGS if a.quick else SIZE_LADDER + SKEW_LADDER, a.settings)
    load_start = os.getloadavg()[0]
    if not a.no_run:
        run_sweep(a.out, settings, seeds, a.quick)
    rows = summarise(a.out, settings, seeds)
    config = demo_config(settings[0], seeds[0], a.quick)
    doc = {"seeds": seeds, "quick": a.quick, "data": config["data"], "train": config["train"],
           "backbone": config["backbone"], "methods": config["methods"], "selection": "best mean source validation",
           "machine": machine(load_start), "results": rows}
    (a.out / RESULTS_FILE).write_text(strict_json(doc, indent=1) + "\n")
    draw(rows, a.out / FIGURE_FILE)
    print(markdown_table(rows))
    print(f"wrote {a.out / RESULTS_FILE} and {a.out / FIGURE_FILE}")
    return doc


if __name__ == "__main__":
    main()
