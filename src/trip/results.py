"""Results: results.json (one entry per method × held-out domain × seed) and the tables made from it."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from trip.config import ALL_DOMAINS, ExperimentCfg, method_label
from trip.data.datasets import get_dataset
from trip.lost_clients import section
from trip.paper import PAPER_COMM, SOURCE, published


def write_results(out: Path, cfg: ExperimentCfg, runs: list[dict], skipped_images: dict[str, int] | None = None,
                  classes: dict[str, list[str]] | None = None) -> None:
    """`skipped_images`: unreadable images left out per domain (data.skip_bad_images); `classes`: base2novel's
    base and novel class names (`trip.classes`)."""
    doc = {"experiment": cfg.name, "dataset": cfg.data.name, "backbone": cfg.backbone.model_dump(),
           "skipped_images": skipped_images or {}, **({"classes": classes} if classes else {}), "runs": runs}
    write_run_file(out / "results.json", strict_json(doc, indent=2))


def write_run_file(path: Path, text: str) -> None:
    from trip import safefile  # imports torch: not at the top, where `trip data` and `trip report` import this

    safefile.write_text(path, text)


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


@dataclass(frozen=True)
class Planned:
    """What a config asks for: every (method, target, seed) a finished run folder holds one entry of."""

    methods: list[str]
    targets: list[str]
    seeds: list[int]

    @classmethod
    def of(cls, cfg: ExperimentCfg) -> Planned:
        targets = get_dataset(cfg.data.name).domains if cfg.data.targets == "all" else cfg.data.targets
        if cfg.protocol == "multidomain":
            targets = [ALL_DOMAINS]
        return cls([method_label(m) for m in cfg.methods], list(targets), list(cfg.seeds))

    def missing(self, runs: list[dict]) -> list[tuple[str, str, int]]:
        """The (method, target, seed) entries not in `runs`, in the order a run makes them."""
        done = {(r["method"], r["target"], r["seed"]) for r in runs}
        return [(m, t, s) for s in self.seeds for m in self.methods for t in self.targets if (m, t, s) not in done]


BASE2NOVEL_NOTE = (
    "Base-to-novel (`protocol: base2novel`, results.json \"classes\"): clients train on the base classes only, and "
    "the round is selected on base-class source validation. Base: the held-out domain's base-class images scored "
    "among the base classes; novel: its novel-class images among the novel classes; HM: their harmonic mean "
    "(`acc`, `acc_last` and `acc_oracle` are the HM). Mean ± std over seeds.")

# The model-selection rules every entry records (trip.federation.rounds.select_round): entry key -> label.
SELECTION_RULES = {"acc": "source validation", "acc_last": "last round", "acc_oracle": "test-selected (oracle)"}


def table_rows(runs: list[dict], dataset: str | None = None, planned: Planned | None = None,
               key: str = "acc") -> tuple[list[str], list[list[str]]]:
    """Methods × targets (+ average) in %, mean ± std over seeds where there are several; `key`: the
    selection rule's accuracy (SELECTION_RULES). With `dataset`, a method with published numbers (trip.paper) is
    followed by the paper's row and ours − paper. With `planned` (the run's config), its methods and targets are
    the rows and columns, and a cell over fewer seeds than planned says so ("(1/3 seeds)"): an unfinished run is
    never averaged as if complete."""
    targets = planned.targets if planned else list(dict.fromkeys(r["target"] for r in runs))
    methods = planned.methods if planned else list(dict.fromkeys(r["method"] for r in runs))
    seeds_planned = len(planned.seeds) if planned else 0
    header = ["method", *targets, "avg", "params/round"]
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m]
        per_target = [[r[key] for r in mine if r["target"] == t] for t in targets]
        seeds = sorted({r["seed"] for r in mine})
        per_seed_avg = [statistics.fmean(r[key] for r in mine if r["seed"] == s) for s in seeds
                        if len({r["target"] for r in mine if r["seed"] == s}) == len(targets)]
        params = f"{mine[0]['comm_params_per_round']:,}" if mine else "—"
        rows.append([m, *(cell(v, seeds_planned) for v in [*per_target, per_seed_avg]), params])
        paper = published(dataset, m) if dataset else None
        if paper:
            rows += _paper_rows(m, paper, targets, [*per_target, per_seed_avg], seeds_planned)
    return header, rows


# The headline accuracies of a base2novel entry (trip.classes): entry key -> the table's title.
PART_TABLES = {"acc_base": "base classes", "acc_novel": "novel classes",
               "acc_hm": "harmonic mean (HM) of base and novel"}


def accuracy_tables(runs: list[dict], dataset: str | None = None,
                    planned: Planned | None = None) -> list[tuple[str, list[str], list[list[str]]]]:
    """The headline tables as (title, header, rows): one (`table_rows`, with the paper's rows where published),
    or for base2novel entries one per part, base, novel and HM, each methods × held-out domains with its own
    average (that of HM is the mean of the per-domain HMs); never the paper's rows, which are not base-to-novel."""
    if not any("acc_hm" in r for r in runs):
        return [("", *table_rows(runs, dataset, planned))]
    return [(title, *table_rows(runs, planned=planned, key=key)) for key, title in PART_TABLES.items()]


def _paper_rows(label: str, paper: dict[str, float], targets: list[str], ours: list[list[float]],
                planned_seeds: int = 0) -> list[list[str]]:
    """The published row and ours − paper per cell; the average only when we ran the paper's targets."""
    theirs = [paper.get(t) for t in targets] + [paper["avg"]]
    comparable = [*(p is not None for p in theirs[:-1]), set(targets) == set(paper) - {"avg"}]
    diffs = [f"{statistics.fmean(o) - p:+.2f}{_partial(o, planned_seeds)}" if o and ok else "—"
             for o, p, ok in zip(ours, theirs, comparable)]
    return [[f"{label} (paper)", *("—" if p is None else f"{p:.2f}" for p in theirs), PAPER_COMM.get(label, "")],
            [f"{label} (ours − paper)", *diffs, ""]]


def cell(values: list[float], planned_seeds: int = 0) -> str:
    """Mean (± std) of `values`, one per seed; marked where fewer seeds than `planned_seeds` are done."""
    if not values:
        return "—"
    text = f"{values[0]:.2f}" if len(values) == 1 else \
        f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}"
    return text + _partial(values, planned_seeds)


def _partial(values: list[float], planned_seeds: int) -> str:
    return f" ({len(values)}/{planned_seeds} seeds)" if len(values) < planned_seeds else ""


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths)),
                      *(fmt.format(*r) for r in rows)])


def write_summary(out: Path, cfg: ExperimentCfg, runs: list[dict], warnings: list[str] = ()) -> str:
    """`warnings`: what the run found wrong beside the numbers (router collapse), listed at the end."""
    tables = accuracy_tables(runs, cfg.data.name)
    labels = ", ".join(method_label(m) for m in cfg.methods)
    text = "\n".join([
        f"# {cfg.name}",
        "",
        f"Data set `{cfg.data.name}`, backbone `{cfg.backbone.name}` ({cfg.backbone.pretrained}), "
        f"seeds {cfg.seeds}, methods {labels}.",
        "",
        "Model selection: source validation. Target accuracy (%) on each held-out domain, at the round with "
        "the best mean source-validation accuracy (BMA model for TRIP, server model otherwise); params/round = "
        "parameters one client sends per round (fp32). results.json also holds each run's last-round accuracy "
        "(`acc_last`) and its test-selected accuracy (`acc_oracle`, an upper bound that looks at the test set); "
        "`trip report` tables them.",
        *(["", BASE2NOVEL_NOTE] if len(tables) > 1 else []),
        *(line for title, header, rows in tables
          for line in ["", *([f"## Target accuracy (%): {title}", ""] if title else []), markdown_table(header, rows)]),
        "",
        *([f"Rows \"(paper)\": {SOURCE}; \"(ours − paper)\" is our mean minus the published number.", ""]
          if any(published(cfg.data.name, r["method"]) for r in runs) else []),
        *privacy_lines(out, cfg, runs),
        *lost_client_lines(out),
        *warning_lines(warnings),
    ])
    write_run_file(out / "summary.md", text)
    return text


def warning_lines(warnings: list[str]) -> list[str]:
    return ["## Warnings", "", *(f"- {w}" for w in warnings), ""] if warnings else []


def lost_client_lines(out: Path) -> list[str]:
    """summary.md's section on the rounds in rounds.jsonl that lost clients (`trip.lost_clients`), if any."""
    lines = section(round_records(out), "## Rounds that lost clients")
    return [*lines, ""] if lines else []


def round_records(out: Path) -> list[dict]:
    """The records of a run folder's rounds.jsonl; a line cut short by a kill is left out."""
    path = out / "rounds.jsonl"
    records = []
    for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def privacy_lines(out: Path, cfg: ExperimentCfg, runs: list[dict]) -> list[str]:
    """Under federation.dp: the epsilon each run has spent after its last round, from rounds.jsonl."""
    dp = cfg.federation.dp
    if dp is None:
        return []
    spent: dict[tuple, float | None] = {}  # run -> epsilon (None: infinite, as strict_json writes it)
    for line in (out / "rounds.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "dp" in record:
            spent[record["method"], record["target"], record["seed"]] = record["dp"]["epsilon"]
    rows = [[r["method"], r["target"], str(r["seed"]), _epsilon(spent, (r["method"], r["target"], r["seed"]))]
            for r in runs]
    return [f"Differential privacy: {dp.mode}-side clipping at norm {dp.clipping_norm:g}, noise multiplier "
            f"{dp.noise_multiplier:g}. Client-level epsilon at delta = {dp.delta:g} that the shared tensors have "
            f"spent after the last round (RDP accountant, docs/federation.md); ∞: no noise; —: nothing trained.",
            "", markdown_table(["method", "held out", "seed", "epsilon"], rows), ""]


def _epsilon(spent: dict[tuple, float | None], run: tuple) -> str:
    if run not in spent:
        return "—"
    return "∞" if spent[run] is None else f"{spent[run]:.3g}"
