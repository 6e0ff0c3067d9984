"""Results: results.json (one entry per method × held-out domain × seed) and the tables made from it."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from trip.config import ExperimentCfg, method_label
from trip.paper import PAPER_COMM, SOURCE, published


def write_results(out: Path, cfg: ExperimentCfg, runs: list[dict],
                  skipped_images: dict[str, int] | None = None) -> None:
    """`skipped_images`: unreadable images left out per domain (data.skip_bad_images)."""
    doc = {"experiment": cfg.name, "dataset": cfg.data.name, "backbone": cfg.backbone.model_dump(),
           "skipped_images": skipped_images or {}, "runs": runs}
    tmp = out / "results.json.tmp"
    tmp.write_text(strict_json(doc, indent=2))
    os.replace(tmp, out / "results.json")


def strict_json(value, **kwargs) -> str:
    """JSON any parser reads: a non-finite float (the accuracy of an empty split) is written as null, never as
    the bare NaN that Python's json writes and strict parsers refuse."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def table_rows(runs: list[dict], dataset: str | None = None) -> tuple[list[str], list[list[str]]]:
    """Methods × targets (+ average) in %, mean ± std over seeds where there are several. With `dataset`, a
    method with published numbers (trip.paper) is followed by the paper's row and ours − paper."""
    targets = list(dict.fromkeys(r["target"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    header = ["method", *targets, "avg", "params/round"]
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        per_target = [[r["acc"] for r in mine if r["target"] == t] for t in targets]
        seeds = sorted({r["seed"] for r in mine})
        per_seed_avg = [statistics.fmean(r["acc"] for r in mine if r["seed"] == s) for s in seeds
                        if len({r["target"] for r in mine if r["seed"] == s}) == len(targets)]
        rows.append([m, *map(_cell, per_target), _cell(per_seed_avg), f"{mine[0]['comm_params_per_round']:,}"])
        paper = published(dataset, m) if dataset else None
        if paper:
            rows += _paper_rows(m, paper, targets, [*per_target, per_seed_avg])
    return header, rows


def _paper_rows(label: str, paper: dict[str, float], targets: list[str],
                ours: list[list[float]]) -> list[list[str]]:
    """The published row and ours − paper per cell; the average only when we ran the paper's targets."""
    theirs = [paper.get(t) for t in targets] + [paper["avg"]]
    comparable = [*(p is not None for p in theirs[:-1]), set(targets) == set(paper) - {"avg"}]
    diffs = [f"{statistics.fmean(o) - p:+.2f}" if o and ok else "—" for o, p, ok in zip(ours, theirs, comparable)]
    return [[f"{label} (paper)", *("—" if p is None else f"{p:.2f}" for p in theirs), PAPER_COMM.get(label, "")],
            [f"{label} (ours − paper)", *diffs, ""]]


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


def write_summary(out: Path, cfg: ExperimentCfg, runs: list[dict]) -> str:
    header, rows = table_rows(runs, cfg.data.name)
    labels = ", ".join(method_label(m) for m in cfg.methods)
    text = "\n".join([
        f"# {cfg.name}",
        "",
        f"Data set `{cfg.data.name}`, backbone `{cfg.backbone.name}` ({cfg.backbone.pretrained}), "
        f"seeds {cfg.seeds}, methods {labels}.",
        "",
        "Target accuracy (%) on each held-out domain, at the round with the best mean source-validation "
        "accuracy (BMA model for TRIP, server model otherwise); params/round = parameters one client "
        "sends per round (fp32).",
        "",
        markdown_table(header, rows),
        "",
        *([f"Rows \"(paper)\": {SOURCE}; \"(ours − paper)\" is our mean minus the published number.", ""]
          if any(published(cfg.data.name, r["method"]) for r in runs) else []),
    ])
    (out / "summary.md").write_text(text)
    return text
