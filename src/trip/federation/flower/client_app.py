"""The ClientApp: a SuperNode holds one domain and serves some of its clients (`node_clients`: all of them under
`--engine flower` and in a deployment, where one process per client would be too many for K = 20; one under
`--engine flower-sim`, whose virtual nodes cost no process each). A train message names the client; the node
trains it exactly as the in-process engine (same images, split, seed and client index) and replies with the shared
tensors and the client's target upload only. Each client's private tensors stay in the node's `context.state`
across rounds (as Flower's FedRep and FedBN keep theirs), never in a reply, and in its `PrivateStore` (for a
resumed run).

Messages: `query` (which domain do you hold, and which of its clients do you serve?), `train` (arrays + lr + client
number, reply: arrays + upload, where the method uploads anything, + num-examples; under client-side DP clipped by
Flower's mod, `dp.py`; under secure aggregation the four SecAgg+ stages, `train_securely`) and `evaluate` (the
deployed server and BMA models, reply: the accuracy on the validation split of each client the node serves, in
client order, or on its whole domain when it holds the held-out one; per part of the splits, `Split.parts`, whose
names go in order in the reply's "parts" record)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from trip.errors import TripError
from trip.federation import secure
from trip.federation.client import ClientUpdate, accuracy, client_update
from trip.federation.flower import node, secagg
from trip.federation.flower.dp import clipping_mod
from trip.federation.flower.private_store import PrivateStore
from trip.federation.flower.protocol import (
    MODELS,
    SHARED,
    RunSpec,
    accuracy_key,
    from_record,
    node_clients,
    to_record,
)
from trip.federation.multidomain import personal_accuracy
from trip.federation.rounds import Client, part_accuracies, round_seed
from trip.federation.server import fedavg
from trip.methods.base import Method, Split, Tensors
from trip.workspace import Workspace

PRIVATE = "private-{}"  # the context.state record of the private tensors of the domain's client k

app = ClientApp()


@dataclass
class Site:
    """This node in this run: its domain, data and method."""

    spec: RunSpec
    domain: str
    clients: list[int]  # the numbers, within the domain, of the clients this node serves
    ws: Workspace
    method: Method
    store: PrivateStore | None

    @classmethod
    def of(cls, context: Context) -> Site:
        spec = RunSpec.from_run_config(context.run_config)
        domain, clients = node_clients(context.node_config, spec)
        data_root = context.node_config.get("data-root")
        if data_root:
            declared = context.node_config.get("dataset")
            node.check_site_data(spec.cfg, str(data_root), None if declared is None else str(declared))
        ws = node.workspace(spec.cfg, [domain], str(data_root) if data_root else None)
        store = PrivateStore.of(context.node_config, spec, domain)
        return cls(spec, domain, clients, ws, node.method_of(ws, spec.method), store)

    def private(self, context: Context, k: int, r: int) -> Tensors:
        """Client k's private tensors for round r: from the node's state, else (a resumed run) from its store,
        else their init before its first round."""
        if PRIVATE.format(k) in context.state.array_records:
            return from_record(context.state[PRIVATE.format(k)], self.ws.backbone.device)
        saved = self.store.latest_before(k, r) if self.store else None
        if saved is not None:
            return {name: t.to(self.ws.backbone.device) for name, t in saved.items()}
        return self.method.init_private(self.spec.seed, self.spec.client_index(self.domain, k), len(self.spec.clients))

    def keep_private(self, context: Context, k: int, r: int, private: Tensors) -> None:
        context.state[PRIVATE.format(k)] = to_record(private)
        if self.store and private:
            self.store.save(k, r, private)

    def client_number(self, config: ConfigRecord) -> int:
        """The client a train message names (a node's only client needs no number)."""
        k = int(config["client"]) if "client" in config else self.clients[0] if len(self.clients) == 1 else None
        if k not in self.clients:
            raise TripError(f"this node serves the clients {self.clients} of {self.domain}; the message names {k}")
        return k

    def in_domain_metrics(self, context: Context, msg: Message, models: dict[str, Tensors]) -> dict:
        """multidomain: each deployed model's accuracy on the node's in-domain test split ("test-<model>"), and
        the personalised models' of the clients it serves ("personal-<model>", in client order) where the method
        has them. A client's private tensors are those after the round being evaluated."""
        test, dev = self.ws.in_domain_tests()[self.domain], self.ws.backbone.device
        r = int(msg.content["config"]["server-round"]) - 1
        out: dict = {f"test-{m}": accuracy(self.method, p, test) for m, p in models.items()}
        for m in models:
            shared = from_record(msg.content[SHARED.format(m)], dev)
            accs = [personal_accuracy(self.method, shared, self.private(context, k, r + 1), test)
                    for k in self.clients]
            if None not in accs:
                out[f"personal-{m}"] = accs
        return out

    def eval_splits(self) -> list[Split]:
        if self.domain == self.spec.target:
            return [self.ws.target(self.domain)]
        clients = self.ws.domain_clients(self.domain, self.spec.seed)
        return [clients[k].val for k in self.clients]


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = Site.of(context)
    return Message(RecordDict({"node": ConfigRecord({"domain": site.domain, "clients": site.clients})}), reply_to=msg)


@app.train(mods=[clipping_mod])
def train(msg: Message, context: Context) -> Message:
    if secagg.is_secure(msg):
        return secaggplus_mod(msg, context, train_securely)
    site = Site.of(context)
    config = msg.content["config"]
    r, k = int(config["server-round"]) - 1, site.client_number(config)
    params = from_record(msg.content["arrays"], site.ws.backbone.device)
    client, update = train_client(site, context, k, r, params, float(config["lr"]))
    metrics = MetricRecord({"num-examples": client.weight, "train-loss": update.loss})
    upload = site.method.target_upload(update.private)
    records = {"arrays": to_record(update.params), **({"upload": to_record(upload)} if upload else {})}
    return Message(RecordDict({**records, "metrics": metrics}), reply_to=msg)


def train_securely(msg: Message, context: Context) -> Message:
    """The masked-vector stage of secure aggregation: train the clients the message names and reply with their
    weighted mean and total weight, which `secaggplus_mod` pre-scales, quantizes and masks (`secagg`). The node
    sees its own clients' updates, nobody else does: the unit of secrecy is the SuperNode. No target upload."""
    site = Site.of(context)
    config, params = secagg.node_work(msg)
    r, lr, sa = int(config["server-round"]) - 1, float(config["lr"]), site.spec.cfg.federation.secagg
    params = {name: t.to(site.ws.backbone.device) for name, t in params.items()}
    updates, weights, metrics = [], [], {}
    for k in map(int, str(config["clients"]).split(",")):
        client, update = train_client(site, context, k, r, params, lr)
        updates.append(update.params)
        weights.append(client.weight if site.method.aggregation == "weighted" else 1)
        metrics[f"loss-{k}"] = update.loss
    mean, weight = fedavg(updates, weights), sum(weights)
    secure.check_weight(weight, sa, site.domain)
    secure.check_prescaled(max(float(t.abs().max()) for t in mean.values()), weight, sa, site.domain)
    return secagg.node_reply(msg, list(params), mean, weight, metrics)


def train_client(site: Site, context: Context, k: int, r: int, params: Tensors,
                 lr: float) -> tuple[Client, ClientUpdate]:
    """Client k's local training of round r (as in-process: its images, seed and client index); its private
    tensors are kept on the node."""
    client = site.ws.domain_clients(site.domain, site.spec.seed)[k]
    update = client_update(site.method, params, client.train, site.spec.cfg.train, lr,
                           round_seed(site.spec.seed, r, site.spec.client_index(site.domain, k)),
                           private=site.private(context, k, r), where=f"client {client.name}, round {r}")
    site.keep_private(context, k, r, update.private)
    return client, update


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = Site.of(context)
    splits = site.eval_splits()
    dev = site.ws.backbone.device
    models = {name: from_record(msg.content[name], dev) for name in MODELS if name in msg.content.array_records}
    acc = {name: [part_accuracies(site.method, params, split) for split in splits] for name, params in models.items()}
    parts = list(splits[0].parts())  # the same parts for every split of a run
    in_domain = site.in_domain_metrics(context, msg, models) if site.spec.cfg.protocol == "multidomain" else {}
    metrics = MetricRecord({**{accuracy_key(m, p): [a[p] for a in per_split] for m, per_split in acc.items()
                               for p in parts}, **in_domain, "num-examples": sum(map(len, splits))})
    return Message(RecordDict({"metrics": metrics, "parts": ConfigRecord({"names": parts})}), reply_to=msg)
