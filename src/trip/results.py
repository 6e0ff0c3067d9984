"""Results: results.json (one entry per method × held-out domain × seed) and the tables made from it."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

from trip.config import ExperimentCfg, method_label


def write_results(out: Path, cfg: ExperimentCfg, runs: list[dict]) -> None:
    doc = {"experiment": cfg.name, "dataset": cfg.data.name, "backbone": cfg.backbone.model_dump(),
           "runs": runs}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out / "results.json")


def table_rows(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Methods × targets (+ average) in %, mean ± std over seeds where there are several."""
    targets = list(dict.fromkeys(r["target"] for r in runs))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    header = ["method", *targets, "avg", "params/round"]
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        cells = [_cell([r["acc"] for r in mine if r["target"] == t]) for t in targets]
        seeds = sorted({r["seed"] for r in mine})
        per_seed_avg = [statistics.fmean(r["acc"] for r in mine if r["seed"] == s) for s in seeds
                        if len({r["target"] for r in mine if r["seed"] == s}) == len(targets)]
        rows.append([m, *cells, _cell(per_seed_avg), f"{mine[0]['comm_params_per_round']:,}"])
    return header, rows


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
    header, rows = table_rows(runs)
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
    ])
    (out / "summary.md").write_text(text)
    return text
