"""The questions the TRIP paper leaves open, asked on the embedded task (`trip study NAME`, docs/studies.md).

A study is a list of arms: each a name, a change to the demo config and the methods it runs. Every arm runs once
per seed (its own run folder under the study's, so an interrupted study continues where it stopped), and the study
writes `study.json` (every arm × method × seed, accuracies and routing diagnostics), `study.md` (mean ± std over
the seeds) and `study.png` into its folder."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from trip.config import ExperimentCfg, load_config
from trip.results import cell, markdown_table, write_run_file

TRIP = {"name": "trip", "num_experts": 4, "n_ctx": 8}  # as the demo runs it
REFERENCE = ({"name": "zeroshot", "templates": "ensemble"}, {"name": "linear-probe"})
HELD_OUT_UNSEEN = "sketch"  # the style the mismatch study leaves out of the tiny CLIP's pretraining


@dataclass(frozen=True)
class Arm:
    name: str
    overrides: tuple[str, ...]  # `--set` overrides of the demo config
    methods: tuple[dict, ...]


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    arms: tuple[Arm, ...]
    targets: tuple[str, ...] | None = None  # None: every style held out in turn
    routing_method: str | None = "TRIP"  # the label whose routing is measured in each arm (None: the arm's name)
    notes: tuple[str, ...] = field(default_factory=tuple)


def _trip(label: str, **settings) -> dict:
    return {**TRIP, "label": label, **settings}


def _shift_ladder() -> Study:
    methods = (*REFERENCE, {"name": "promptfl", "n_ctx": 16}, _trip("TRIP"),
               _trip("TRIP image-level", routing="image-hard"))
    arms = tuple(Arm(f"shift {s:g}", (f"data.shift={s}",), methods) for s in (0.0, 0.25, 0.5, 0.75, 1.0))
    return Study("shift-ladder", "How do zero-shot, the probe, PromptFL and TRIP (token- and image-level routing) "
                 "move as the styles diverge, and does TRIP's routing stay stable?", arms)


def _anchor() -> Study:
    seen = [s for s in ("photo", "cartoon", "sketch", "painting") if s != HELD_OUT_UNSEEN]
    styles = "[" + ",".join(seen) + "]"
    arms = tuple(Arm(f"{label} backbone", (f"backbone.pretrain_styles={styles}",) if unseen else (),
                     (*REFERENCE, *(_trip(f"TRIP kl {w:g}", kl_weight=w) for w in (0.0, 0.2, 0.8, 1.0))))
                 for label, unseen in (("style-blind", True), ("style-aware", False)))
    return Study("anchor", f"Does the zero-shot anchor (the KL weight) help or hurt when the held-out style "
                 f"({HELD_OUT_UNSEEN}) is one the backbone never saw in pretraining?", arms,
                 targets=(HELD_OUT_UNSEEN,), routing_method="TRIP kl 1")


def _router() -> Study:
    variants = {"TRIP": {}, "random assignment": {"assignment": "random"},
                "greedy assignment": {"assignment": "greedy"}, "no capacity": {"capacity_train": None},
                "M=1": {"num_experts": 1}, "learned router": {"routing": "learned"},
                "image-level": {"routing": "image-hard"}, "capacity 1.5/3": {"capacity_train": 1.5,
                                                                             "capacity_infer": 3.0},
                "k-means 1 iter": {"kmeans_iters": 1}, "k-means 10 iters": {"kmeans_iters": 10},
                "k-means tol 1e-2": {"kmeans_tol": 1e-2}, "k-means tol 0": {"kmeans_tol": 0.0}}
    arms = tuple(Arm(name, (), (_trip(name, **settings),)) for name, settings in variants.items())
    return Study("router", "Which parts of the parameter-free router matter: assignment, capacity, k-means "
                 "iterations, token- against image-level, the number of experts?", arms, routing_method=None)


def routed_label(study: Study, arm: Arm) -> str | None:
    """The label of the arm's method whose token routing is measured, if the arm has one that routes tokens."""
    label = study.routing_method or arm.name
    method = next((m for m in arm.methods if m.get("label") == label), None)
    return label if method and method["name"] in ("trip", "trip-lite") and method.get("routing", "token") == "token" \
        else None


def _lite() -> Study:
    arms = (Arm("TRIP vs TRIP-Lite", (), (*REFERENCE, _trip("TRIP"), {"name": "trip-lite", "label": "TRIP-Lite"})),)
    return Study("lite", "What does TRIP-Lite (1,024 parameters per round at ViT-B/16) give up against TRIP?", arms)


STUDIES = {s.name: s for s in (_shift_ladder(), _anchor(), _router(), _lite())}


def demo_config(overrides: list[str]) -> ExperimentCfg:
    config = resources.files("trip") / "configs" / "demo.yaml"
    with resources.as_file(config) as path:
        return load_config(path, overrides)


def arm_config(study: Study, arm: Arm, seed: int, quick: bool) -> ExperimentCfg:
    targets = "[" + ",".join(study.targets) + "]" if study.targets else "all"
    overrides = [*arm.overrides, f"seeds=[{seed}]", f"data.targets={targets}"]
    overrides += ["train.rounds=2", "data.images_per_class=12"] if quick else []
    cfg = demo_config(overrides)
    methods = [{**m, **({"key_seed": seed} if m["name"] in ("trip", "trip-lite") else {})} for m in arm.methods]
    return ExperimentCfg.model_validate({**cfg.model_dump(), "methods": methods})


def run_study(name: str, out: Path, seeds: list[int], quick: bool = False) -> Path:
    """Runs every arm of a study for every seed into `out` (finished runs are kept) and writes its reports."""
    from trip.experiment import run_experiment

    study = STUDIES[name]
    records = []
    for arm in study.arms:
        for seed in seeds:
            cfg = arm_config(study, arm, seed, quick)
            folder = out / _slug(arm.name) / f"seed{seed}"
            for run in run_experiment(cfg, folder):
                records.append({"arm": arm.name, "method": run["method"], "target": run["target"], "seed": seed,
                                "acc": run["acc"]})
    routing = {arm.name: routing_stability(study, arm, seeds, quick) for arm in study.arms if routed_label(study, arm)}
    doc = {"study": study.name, "question": study.question, "seeds": seeds, "quick": quick, "runs": records,
           "routing": routing}
    write_run_file(out / "study.json", json.dumps(doc, indent=2))
    write_run_file(out / "study.md", study_markdown(doc))
    draw(doc, out / "study.png")
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in name.lower())


def accuracy_table(doc: dict) -> tuple[list[str], list[list[str]]]:
    """Rows: arm × method; the cell is the mean over held-out styles, as mean ± std over seeds."""
    pairs = dict.fromkeys((r["arm"], r["method"]) for r in doc["runs"])
    rows = [[arm, method, cell(_per_seed(doc, arm, method))] for arm, method in pairs]
    return ["arm", "method", "held-out accuracy (mean over styles)"], rows


def _per_seed(doc: dict, arm: str, method: str) -> list[float]:
    """The mean over held-out styles of each seed's run."""
    return [float(np.mean([r["acc"] for r in doc["runs"] if (r["arm"], r["method"], r["seed"]) == (arm, method, s)]
                          or [np.nan])) for s in doc["seeds"]]


def study_markdown(doc: dict) -> str:
    header, rows = accuracy_table(doc)
    quick = " (quick: 2 rounds, 12 images per class)" if doc["quick"] else ""
    parts = [f"# Study `{doc['study']}`", "", doc["question"], "",
             f"Seeds {', '.join(map(str, doc['seeds']))}{quick}.", "", markdown_table(header, rows)]
    if doc["routing"]:
        parts += ["", "Each arm's token router (every image of every style; top expert = largest weight):", "",
                  markdown_table(["arm", "top expert differs between seeds", "differs train vs infer",
                                  "usage entropy / log M", "collapsed"],
                                 [[arm, f"{r['between_seeds']:.1%}", f"{r['train_vs_infer']:.1%}",
                                   f"{r['entropy']:.2f}", "yes" if r["collapsed"] else "no"]
                                  for arm, r in doc["routing"].items()])]
    return "\n".join(parts) + "\n"


def routing_stability(study: Study, arm: Arm, seeds: list[int], quick: bool) -> dict:
    """From the cached routing weights of every image: the share whose top expert differs between the key seeds
    of the runs (after matching the experts of two seeds one to one, as their labels are arbitrary), and between
    the train and infer runs of one seed; the entropy of mean expert usage over log M; collapse (one expert's mean
    weight over `trip.expert_usage.collapse_threshold`, over every style at once)."""
    from trip.expert_usage import collapse_threshold
    from trip.workspace import prepare

    tops, usage = {}, None
    for seed in seeds:
        cfg = arm_config(study, arm, seed, quick)
        cfg = ExperimentCfg.model_validate({**cfg.model_dump(), "methods": [
            m for m in cfg.model_dump()["methods"] if m.get("label") == routed_label(study, arm)]})
        ws = prepare(cfg)
        method = ws.methods[0]
        weights = {phase: torch.cat([ws.frozen[d].routing[spec.key()] for d in ws.frozen])
                   for phase, spec in (("train", method.route_train), ("infer", method.route_infer))}
        tops[seed] = {phase: w.argmax(1) for phase, w in weights.items()}
        usage = usage if usage is not None else weights["train"].double().mean(0)
    m = len(usage)
    first = tops[seeds[0]]["train"]
    between = [_matched_disagreement(first, tops[s]["train"], m) for s in seeds[1:]]
    entropy = float(-(usage * usage.clamp_min(1e-12).log()).sum() / np.log(m)) if m > 1 else 0.0
    return {"between_seeds": float(np.mean(between)) if between else 0.0,
            "train_vs_infer": float(np.mean([(t["train"] != t["infer"]).double().mean() for t in tops.values()])),
            "entropy": entropy, "collapsed": bool(m > 1 and usage.max() > collapse_threshold(m))}


def _matched_disagreement(a: torch.Tensor, b: torch.Tensor, m: int) -> float:
    """The share of images whose top expert differs, after relabelling b's experts to agree with a's the most."""
    from scipy.optimize import linear_sum_assignment

    counts = torch.zeros(m, m, dtype=torch.float64)
    counts.index_put_((a, b), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    rows, cols = linear_sum_assignment(-counts.numpy())
    return float(1 - counts.numpy()[rows, cols].sum() / max(1, len(a)))


def draw(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, rows = accuracy_table(doc)
    arms = list(dict.fromkeys(r[0] for r in rows))
    methods = list(dict.fromkeys(r[1] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(arms) + 2), 4))
    for method in methods:
        per_seed = [_per_seed(doc, arm, method) for arm in arms]
        means = [np.mean(v) for v in per_seed]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_seed]  # the table's (sample) std
        ax.errorbar(range(len(arms)), means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"trip study {doc['study']} (mean ± std over seeds {', '.join(map(str, doc['seeds']))})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
