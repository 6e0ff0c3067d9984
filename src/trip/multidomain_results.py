"""The tables of a `protocol: multidomain` run folder (summary.md, `trip report`): rows are methods, columns the
domains and their mean, in-domain test accuracy in %, mean ± std over seeds; one table for the deployed (global)
model and one for the clients' personalised models, where a method has them (`federation/multidomain.py`)."""

from __future__ import annotations

from pathlib import Path

from trip.config import ExperimentCfg, method_label
from trip.data.datasets import get_dataset
from trip.results import cell, lost_client_lines, markdown_table, text_table, warning_lines, write_run_file

# results.json entry key of the per-domain accuracies -> (the key of their mean, what the table shows)
TABLES = {
    "domains": ("acc", "deployed (global) model, at the round selected by validation"),
    "personal": ("personal_mean", "personalised models (global + the client's own private tensors), same round"),
    "domains_last": ("acc_last", "deployed model, last round"),
    "personal_last": ("personal_mean_last", "personalised models, last round"),
    "domains_oracle": ("acc_oracle", "deployed model, test-selected round (oracle: an upper bound, never a result)"),
}
HEADLINE = ("domains", "personal")


def table_rows(runs: list[dict], domains: list[str], methods: list[str], key: str = "domains",
               planned_seeds: int = 0) -> tuple[list[str], list[list[str]]]:
    """Methods × (domains + mean) of `key` (TABLES); a method whose entries lack `key` (no personalised models)
    has no row. A cell over fewer seeds than `planned_seeds` says so."""
    mean_key = TABLES[key][0]
    header = ["method", *domains, "mean", "params/round"]
    rows = []
    for m in methods:
        mine = [r for r in runs if r["method"] == m and r.get(key) is not None]
        if not mine:
            continue
        per_domain = [[r[key][d] for r in mine if r[key].get(d) is not None] for d in domains]
        means = [r[mean_key] for r in mine if r.get(mean_key) is not None]
        rows.append([m, *(cell(v, planned_seeds) for v in [*per_domain, means]),
                     f"{mine[0]['comm_params_per_round']:,}"])
    return header, rows


def tables(runs: list[dict], domains: list[str], methods: list[str], keys=HEADLINE, planned_seeds: int = 0,
           heading: str = "###") -> list[str]:
    """Markdown lines: a titled table per key of `keys` that some entry has."""
    lines = []
    for key in keys:
        header, rows = table_rows(runs, domains, methods, key, planned_seeds)
        if rows:
            lines += ["", f"{heading} {TABLES[key][1].capitalize()}", "", markdown_table(header, rows)]
    return lines


def text_tables(cfg: ExperimentCfg, runs: list[dict]) -> str:
    """The headline tables as plain text (what `trip run` prints)."""
    domains, labels = list(get_dataset(cfg.data.name).domains), [method_label(m) for m in cfg.methods]
    parts = [f"{TABLES[key][1]}:\n{text_table(header, rows)}" for key in HEADLINE
             for header, rows in [table_rows(runs, domains, labels, key)] if rows]
    return "\n\n".join(parts)


def write_summary(out: Path, cfg: ExperimentCfg, runs: list[dict], warnings: list[str] = ()) -> str:
    """`warnings`: as `trip.results.write_summary`'s."""
    domains = list(get_dataset(cfg.data.name).domains)
    labels = [method_label(m) for m in cfg.methods]
    text = "\n".join([
        f"# {cfg.name}",
        "",
        f"Data set `{cfg.data.name}`, backbone `{cfg.backbone.name}` ({cfg.backbone.pretrained}), seeds "
        f"{cfg.seeds}, methods {', '.join(labels)}; protocol multidomain: every domain is a client (or "
        f"{cfg.federation.clients_per_domain} per domain), each domain tested on its own held-out test split.",
        "",
        "In-domain test accuracy (%) per domain and their mean, at the round with the best mean validation "
        "accuracy over the clients (BMA model for TRIP, server model otherwise). A domain's personalised accuracy "
        "is the mean over its clients. params/round = parameters one client sends per round (fp32). results.json "
        "also holds the last round's and the test-selected (oracle) numbers; `trip report` tables them.",
        *tables(runs, domains, labels, planned_seeds=len(cfg.seeds), heading="##"),
        "",
        *lost_client_lines(out),
        *warning_lines(warnings),
    ])
    write_run_file(out / "summary.md", text)
    return text
