"""Rounds that lost clients: what a round record says went missing beyond the round's design.

A round asks the clients it samples, less the seeded drops of `federation.drop_rate` (by design: "dropped"), to
train, and every source client to validate the deployed models. A client that was asked and sent no accepted
update, a client without a validation accuracy, or anything named under "failed" (a node that failed, timed out,
went offline or had its update refused, or the held-out domain's node that did not evaluate) is lost: the round
did not go as configured. Such a round is reported (summary.md, `trip report`) and is never the base of a resume
(`trip.checkpoint.RunCheckpoints.latest`): a run stopped while its clients were going could otherwise go on from
rounds trained without them."""

from __future__ import annotations

from trip.config import ALL_DOMAINS


def lost_clients(record: dict) -> dict[str, str]:
    """Client (or held-out domain) -> why round `record` lost it; empty for a round that went as configured."""
    lost = dict(record.get("failed") or {})
    asked = [c for c in record.get("sampled", []) if c not in record.get("dropped", [])]
    for name in asked:
        if name not in record.get("participants", []):
            lost.setdefault(name, "asked to train, sent no accepted update")
    validated = [set(ev.get("val", {})) for ev in record.get("eval", {}).values() if isinstance(ev, dict)]
    for name in record.get("sampled", []):
        if any(name not in v for v in validated):
            lost.setdefault(name, "no validation accuracy")
    return lost


def rounds_that_lost_clients(records: list[dict]) -> list[tuple[dict, dict[str, str]]]:
    """(record, its lost clients) of every record that lost some, in the order given."""
    return [(r, lost) for r in records if (lost := lost_clients(r))]


def describe(lost: dict[str, str]) -> str:
    """e.g. "sketch (its node is not connected), painting (no validation accuracy)"."""
    return ", ".join(f"{name} ({why})" for name, why in lost.items())


def report_lines(records: list[dict]) -> list[str]:
    """Markdown bullets, one per training run (method, held-out domain, seed of rounds.jsonl) with rounds that
    lost clients, naming each round and its clients; none when every round went as configured."""
    runs: dict[tuple, list[str]] = {}
    for record, lost in rounds_that_lost_clients(records):
        run = (record.get("method", "?"), record.get("target", "?"), record.get("seed", "?"))
        runs.setdefault(run, []).append(f"round {record['round']}: {describe(lost)}")
    return [f"- {m}, {'in-domain' if t == ALL_DOMAINS else f'held out {t}'}, seed {s}: " + "; ".join(rounds)
            for (m, t, s), rounds in runs.items()]


EXPLANATION = (
    "These rounds went on without some of their clients, beyond the seeded drops of `federation.drop_rate`: a "
    "client asked to train sent no accepted update, or a source client has no validation accuracy (the mean that "
    "selects the round is then over fewer clients). The results include these rounds; `failed` in rounds.jsonl "
    "holds each reason.")


def section(records: list[dict], heading: str) -> list[str]:
    """summary.md's Markdown section on the rounds of `records` that lost clients; no lines when none did."""
    bullets = report_lines(records)
    return [heading, "", EXPLANATION, "", *bullets] if bullets else []
