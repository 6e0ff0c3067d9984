"""The round protocol's part for `protocol: multidomain` (docs/reproduce.md, "Multi-domain"), called by both
engines: every domain's clients train as in any run and the round is selected, as always, by the mean over the
clients of the deployed model's validation accuracy; what differs is the test. Each round the deployed models
are tested on every domain's in-domain test split, and each client's personalised model
(`Method.personal_model` of the global tensors and its private ones) on its own domain's.

The round record's "eval" entry per model holds, besides "val" and "val_mean": "test" (domain -> accuracy of the
deployed model), "target" (their mean over the domains, what the rest of trip plots and selects an oracle by)
and, for a method with personalised models, "personal" (domain -> the mean over the domain's clients, which are
all tested on the same images, so it is also their image-weighted mean) and "personal_mean"."""

from __future__ import annotations

import statistics

from trip.federation.client import accuracy
from trip.federation.partition import client_domain
from trip.federation.rounds import Client, Server, select_round
from trip.methods.base import Method, Split, Tensors


def personal_accuracy(method: Method, shared: Tensors, private: Tensors, split: Split) -> float | None:
    """Accuracy of a client's personalised model on `split`; None for a method without one."""
    model = method.personal_model(shared, private)
    return None if model is None else accuracy(method, model, split)


def evaluate(method: Method, server: Server, clients: list[Client], privates: list[Tensors],
             tests: dict[str, Split]) -> dict:
    """The in-process evaluation of a multidomain round (a Flower node computes the same numbers for its clients)."""
    models = server.models()
    val = {m: {c.name: accuracy(method, p, c.val) for c in clients} for m, p in models.items()}
    test = {m: {d: accuracy(method, p, split) for d, split in tests.items()} for m, p in models.items()}
    personal = {m: {c.name: personal_accuracy(method, shared, private, tests[client_domain(c.name)])
                    for c, private in zip(clients, privates, strict=True)}
                for m, shared in server.shared().items()}
    return eval_record(val, test, personal)


def eval_record(val: dict[str, dict[str, float]], test: dict[str, dict[str, float]],
                personal: dict[str, dict[str, float | None]]) -> dict:
    """`val`: model -> client -> accuracy; `test`: model -> domain -> accuracy (domain order); `personal`:
    model -> client -> accuracy of its personalised model (None: the method has none)."""
    out = {}
    for m, v in val.items():
        out[m] = {"val": v, "val_mean": _mean(v.values()), "target": _mean(test[m].values()), "test": test[m]}
        per_client = {c: a for c, a in personal.get(m, {}).items() if a is not None}
        if per_client:
            domains = list(dict.fromkeys(map(client_domain, per_client)))
            by_domain = {d: _mean(a for c, a in per_client.items() if client_domain(c) == d) for d in domains}
            out[m] |= {"personal": by_domain, "personal_mean": _mean(by_domain.values())}
    return out


def select(history: list[dict], model: str) -> dict:
    """`select_round`'s entry (its "acc": the mean in-domain test accuracy of the deployed model) with the
    per-domain accuracies at the selected round, the last one and the oracle one; for a method with personalised
    models, theirs at the selected and the last round (personalised models select no round)."""
    chosen = select_round(history, model)
    at = {h["round"]: h["eval"][model] for h in history}
    best, last, oracle = (at[chosen[k]] for k in ("selected_round", "last_round", "oracle_round"))
    out = {**chosen, "domains": best["test"], "domains_last": last["test"], "domains_oracle": oracle["test"]}
    if "personal" in best:
        out |= {"personal": best["personal"], "personal_mean": best["personal_mean"],
                "personal_last": last["personal"], "personal_mean_last": last["personal_mean"]}
    return out


def _mean(values) -> float:
    return statistics.fmean(values)
