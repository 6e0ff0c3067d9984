"""The round protocol, one module that the in-process engine and the Flower ServerApp/ClientApp both call, so the
two cannot drift: the lr schedule, the clients' seeds, the aggregation (the method's), the BMA, the deployed
models, the round record, evaluation and round selection.

A round r: the clients that take part (`participation`: a seeded sample of `federation.fraction` of them, less
the seeded `federation.drop_rate` drops; every client when both are off) train from the global tensors with lr(r)
and their seeds (client index order), keep their private tensors and return the shared ones with their upload for
the target (`Method.target_upload`); the server averages the accepted updates in client-index order with the
method's weights (a round in which every sampled client dropped keeps the global tensors), updates the BMA, and
evaluates the deployed models (`Method.target_model` of the server and BMA tensors with the latest uploads) on
every source client's validation split and on the held-out domain. The round is selected by mean
source-validation accuracy of the deployed BMA (else server) model: the model that would be deployed on the
target; the last round's and the test-selected ("oracle") accuracies are recorded beside it (`select_round`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trip.checkpoint import FederationState
from trip.classes import harmonic_mean
from trip.config import FederationCfg, TrainCfg
from trip.errors import TripError
from trip.federation.client import accuracy
from trip.federation.server import BMA, fedavg
from trip.methods.base import Method, Split, Tensors


@dataclass
class Client:
    name: str  # the domain (one client per domain), else "<domain>/<k>"
    train: Split
    val: Split
    weight: int  # FedAvg weight: the images the client holds, or its train split (train.fedavg_weight)


@dataclass
class Accepted:
    """A client's update that the server aggregates."""

    index: int  # the client's index among the run's source clients (canonical order)
    name: str
    params: Tensors  # the shared tensors after local training
    weight: int
    loss: float
    upload: Tensors  # Method.target_upload of its private tensors after the round


@dataclass
class Report:
    """A client whose update is inside a securely aggregated sum: the server knows its train loss, never its
    update (`Server.aggregate_from_sum`)."""

    index: int
    name: str
    loss: float


def round_lr(train: TrainCfg, r: int) -> float:
    return train.lr * train.lr_decay**r


def round_seed(seed: int, round_idx: int, client_idx: int) -> int:
    """Seeds a client's batch order in a round: independent of the engine and of other clients."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_idx) % (2**63)


@dataclass(frozen=True)
class Participation:
    """Who takes part in a round, by client index: the sample, and those of it that fail to report."""

    sampled: list[int]
    dropped: list[int]

    @property
    def reporting(self) -> list[int]:
        return [i for i in self.sampled if i not in self.dropped]

    def names(self, clients: list[str]) -> dict[str, list[str]]:
        return {"sampled": [clients[i] for i in self.sampled], "dropped": [clients[i] for i in self.dropped]}


def participation(fed: FederationCfg, seed: int, round_idx: int, clients: int) -> Participation:
    """A seeded function of (seed, round) alone, so both engines sample and drop the same clients."""
    if fed.fraction == 1 and fed.drop_rate == 0:
        return Participation(list(range(clients)), [])
    rng = np.random.default_rng([seed, round_idx])
    size = sample_size(fed, clients)
    sampled = sorted(int(i) for i in rng.choice(clients, size=size, replace=False))
    dropped = [i for i, u in zip(sampled, rng.random(size), strict=True) if u < fed.drop_rate]
    return Participation(sampled, dropped)


def sample_size(fed: FederationCfg, clients: int) -> int:
    """The clients sampled per round: `fraction` of them, rounded, at least one."""
    return max(1, int(fed.fraction * clients + 0.5))


def selection_model(method: Method) -> str:
    return "bma" if method.uses_bma else "server"


class Server:
    """The server's side of one run: global tensors, BMA, the clients' latest target uploads, the history."""

    def __init__(self, method: Method, train: TrainCfg, seed: int, clients: int):
        self.method = method
        self.params = method.init_params(seed)
        # Before a client's first update its upload is that of its initial private state (the same on every
        # engine: init_private is a function of the seed and the client index alone).
        self.uploads = [method.target_upload(method.init_private(seed, i, clients)) for i in range(clients)]
        cfg = method.cfg
        self.bma = BMA(self.params, train.rounds, cfg.bma_beta, cfg.bma_include_init) \
            if method.uses_bma and method.trainable else None
        self.history: list[dict] = []
        self.next_round = 0

    def restore(self, state: FederationState, privates: list[Tensors]) -> None:
        self.params, self.history, self.next_round = state.params, list(state.history), state.next_round
        if state.uploads or privates:  # a checkpoint of an older trip holds no uploads
            self.uploads = list(state.uploads) or [self.method.target_upload(p) for p in privates]
        if self.bma is not None:
            self.bma.params, self.bma.total = state.bma_params, state.bma_total

    def aggregate(self, r: int, accepted: list[Accepted], failed: dict[str, str]) -> None:
        self.commit(r, self.average(r, accepted, failed))

    def average(self, r: int, accepted: list[Accepted], failed: dict[str, str]) -> Tensors:
        """The method's average of the accepted updates, and their uploads kept. No update and no failure (every
        sampled client dropped): the global tensors as they were."""
        if not accepted and failed:
            raise every_client_failed(r, failed)
        accepted = sorted(accepted, key=lambda a: a.index)
        for a in accepted:
            self.uploads[a.index] = a.upload
        return fedavg([a.params for a in accepted], self.weights(accepted)) if accepted else self.params

    def weights(self, accepted: list[Accepted]) -> list[int]:
        """The aggregation weights of the accepted updates (client-index order)."""
        accepted = sorted(accepted, key=lambda a: a.index)
        return [a.weight for a in accepted] if self.method.aggregation == "weighted" else [1] * len(accepted)

    def commit(self, r: int, params: Tensors) -> None:
        """Round r's global tensors (the average, or what a privacy mechanism made of it) and the BMA with them."""
        self.params = params
        if self.bma is not None:
            self.bma.update(self.params, r)

    def aggregate_from_sum(self, r: int, mean: Tensors | None, failed: dict[str, str]) -> None:
        """Secure aggregation: `mean` is the sum of the reporting clients' weight-scaled updates divided by the
        sum of their weights, both summed under masks (the server never holds a client's update); None: no
        update came. The target uploads stay as they were: no method that needs them is run this way
        (`trip.federation.secure.check`)."""
        if mean is None and failed:
            raise every_client_failed(r, failed)
        self.commit(r, self.params if mean is None else mean)

    def shared(self) -> dict[str, Tensors]:
        """The global tensors, by model name: "server" (and "bma")."""
        return {"server": self.params} | ({"bma": self.bma.params} if self.bma is not None else {})

    def models(self) -> dict[str, Tensors]:
        """The deployed models, by name: "server" (and "bma")."""
        return {name: self.method.target_model(p, self.uploads) for name, p in self.shared().items()}

    def log(self, record: dict) -> None:
        self.history.append(record)
        self.next_round = record["round"] + 1

    def state(self, privates: list[Tensors]) -> FederationState:
        bma = self.bma
        return FederationState(self.next_round, self.params, bma.params if bma else None, bma.total if bma else 0.0,
                               self.history, privates, self.uploads)


def every_client_failed(r: int, failed: dict[str, str]) -> TripError:
    return TripError(f"round {r}: every client failed ({'; '.join(failed.values())}); stopping with the global state "
                     f"of round {r - 1} unchanged")


def eval_record(val: dict[str, dict[str, dict[str, float]]], target: dict[str, dict[str, float]]) -> dict:
    """`val`: model -> client -> part -> accuracy; `target`: model -> part -> accuracy (parts: `Split.parts`).
    The "eval" entry of a round record: "val" per client and "val_mean" are the first part's (what selects the
    round), "target" the harmonic mean over the parts (with one part, its accuracy). With several parts (base and
    novel, `trip.classes`), each part's also: "val_<part>", "val_<part>_mean", "target_<part>", and "val_hm"."""
    out = {}
    for m, per_client in val.items():
        parts = list(next(iter(per_client.values())))
        acc = {p: {c: a[p] for c, a in per_client.items()} for p in parts}
        means = {p: sum(acc[p].values()) / len(acc[p]) for p in parts}
        tgt = {p: target.get(m, {}).get(p, math.nan) for p in parts}
        out[m] = {"val": acc[parts[0]], "val_mean": means[parts[0]], "target": harmonic_mean(list(tgt.values()))}
        if len(parts) > 1:
            out[m] |= {k: v for p in parts for k, v in ((f"val_{p}", acc[p]), (f"val_{p}_mean", means[p]))}
            out[m] |= {"val_hm": harmonic_mean(list(means.values())), **{f"target_{p}": tgt[p] for p in parts}}
    return out


def part_accuracies(method: Method, params: Tensors, split: Split) -> dict[str, float]:
    """Accuracy on each part of the split (`Split.parts`), by part name."""
    return {name: accuracy(method, params, part) for name, part in split.parts().items()}


def evaluate(method: Method, models: dict[str, Tensors], clients: list[Client], target: Split) -> dict:
    """Source-validation accuracy per client (every source client, sampled or not), their mean, and target
    accuracy, for each deployed model and each part of the splits."""
    val = {m: {c.name: part_accuracies(method, p, c.val) for c in clients} for m, p in models.items()}
    return eval_record(val, {m: part_accuracies(method, p, target) for m, p in models.items()})


def round_record(r: int, lr: float, taking_part: dict[str, list[str]], accepted: list[Accepted] | list[Report],
                 failed: dict[str, str], ev: dict, seconds: float) -> dict:
    """`taking_part`: `Participation.names`; "participants" are the clients whose update was aggregated."""
    accepted = sorted(accepted, key=lambda a: a.index)
    return {"round": r, "lr": lr, "train_loss": {a.name: a.loss for a in accepted}, **taking_part,
            "participants": [a.name for a in accepted], "failed": failed, "eval": ev, "time_s": seconds}


def select_round(history: list[dict], model: str) -> dict:
    """The round with the best mean source-validation accuracy of `model` (first one on ties, as the
    official strict `>`), and the target accuracies there: the headline rule. Beside it, for `model`, the other
    two rules DomainBed reports, from the same history: the last round, and the round with the best target
    accuracy ("oracle": it selects on the test set, so it is an upper bound, never a result; first on ties)."""
    best = max(history, key=lambda h: (h["eval"][model]["val_mean"], -h["round"]))
    last = max(history, key=lambda h: h["round"])
    # A round whose target accuracy is missing (NaN: the held-out node did not answer) is never the oracle's.
    oracle = max(history, key=lambda h: (_or_lowest(h["eval"][model]["target"]), -h["round"]))
    return {"selected_round": best["round"], "selected_on": model,
            "val_mean": best["eval"][model]["val_mean"],
            "acc": best["eval"][model]["target"],
            **{f"acc_{name}": ev["target"] for name, ev in best["eval"].items()},
            "last_round": last["round"], "acc_last": last["eval"][model]["target"],
            "oracle_round": oracle["round"], "acc_oracle": oracle["eval"][model]["target"],
            **_part_accuracies({"": best, "_last": last, "_oracle": oracle}, model)}


def _part_accuracies(rounds: dict[str, dict], model: str) -> dict[str, float]:
    """With several parts (base2novel): each part's target accuracy and their harmonic mean ("acc_hm", equal to
    "acc") at each rule's round, e.g. acc_novel, acc_novel_last, acc_novel_oracle."""
    out = {}
    for suffix, record in rounds.items():
        ev = record["eval"][model]
        parts = {k.removeprefix("target_"): v for k, v in ev.items() if k.startswith("target_")}
        out |= {f"acc_{p}{suffix}": v for p, v in [*parts.items(), *([("hm", ev["target"])] if parts else [])]}
    return out


def _or_lowest(acc: float) -> float:
    return -math.inf if math.isnan(acc) else acc
