"""The ClientApp: a SuperNode holds one domain and serves every client of it (federation.clients_per_domain; one
process per client would be too many for K = 20). A train message names the client; the node trains it exactly as
the in-process engine (same images, split, seed and client index) and replies with the shared tensors and the
client's target upload only. Each client's private tensors stay in the node's `context.state` across rounds (as
Flower's FedRep and FedBN keep theirs), never in a reply, and in its `PrivateStore` (for a resumed run).

Messages: `query` (which domain do you hold?), `train` (arrays + lr + client number, reply: arrays + upload +
num-examples) and `evaluate` (the deployed server and BMA models, reply: the accuracy on each of the node's
clients' validation splits, in client order, or on its whole domain when it holds the held-out one)."""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from trip.federation.client import accuracy, client_update
from trip.federation.flower import node
from trip.federation.flower.private_store import PrivateStore
from trip.federation.flower.protocol import MODELS, SHARED, RunSpec, from_record, node_domain, to_record
from trip.federation.multidomain import personal_accuracy
from trip.federation.rounds import round_seed
from trip.methods.base import Method, Split, Tensors
from trip.workspace import Workspace

PRIVATE = "private-{}"  # the context.state record of the private tensors of the domain's client k

app = ClientApp()


@dataclass
class Site:
    """This node in this run: its domain, data and method."""

    spec: RunSpec
    domain: str
    ws: Workspace
    method: Method
    store: PrivateStore | None

    @classmethod
    def of(cls, context: Context) -> Site:
        spec = RunSpec.from_run_config(context.run_config)
        domain = node_domain(context.node_config, spec)
        data_root = context.node_config.get("data-root")
        if data_root:
            declared = context.node_config.get("dataset")
            node.check_site_data(spec.cfg, str(data_root), None if declared is None else str(declared))
        ws = node.workspace(spec.cfg, [domain], str(data_root) if data_root else None)
        store = PrivateStore.of(context.node_config, spec.method, spec.target, spec.seed, domain)
        return cls(spec, domain, ws, node.method_of(ws, spec.method), store)

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

    def in_domain_metrics(self, context: Context, msg: Message, models: dict[str, Tensors]) -> dict:
        """multidomain: each deployed model's accuracy on the node's in-domain test split ("test-<model>"), and
        each of its clients' personalised models' ("personal-<model>", in client order) where the method has them.
        A client's private tensors are those after the round being evaluated."""
        test, dev = self.ws.in_domain_tests()[self.domain], self.ws.backbone.device
        r = int(msg.content["config"]["server-round"]) - 1
        out: dict = {f"test-{m}": accuracy(self.method, p, test) for m, p in models.items()}
        for m in models:
            shared = from_record(msg.content[SHARED.format(m)], dev)
            accs = [personal_accuracy(self.method, shared, self.private(context, k, r + 1), test)
                    for k in range(self.spec.cfg.federation.clients_per_domain)]
            if None not in accs:
                out[f"personal-{m}"] = accs
        return out

    def eval_splits(self) -> list[Split]:
        if self.domain == self.spec.target:
            return [self.ws.target(self.domain)]
        return [c.val for c in self.ws.domain_clients(self.domain, self.spec.seed)]


@app.query()
def query(msg: Message, context: Context) -> Message:
    site = Site.of(context)
    return Message(RecordDict({"node": ConfigRecord({"domain": site.domain})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = Site.of(context)
    config = msg.content["config"]
    r, k = int(config["server-round"]) - 1, int(config.get("client", 0))  # a domain's only client needs no number
    params = from_record(msg.content["arrays"], site.ws.backbone.device)
    client = site.ws.domain_clients(site.domain, site.spec.seed)[k]
    update = client_update(site.method, params, client.train, site.spec.cfg.train, float(config["lr"]),
                           round_seed(site.spec.seed, r, site.spec.client_index(site.domain, k)),
                           private=site.private(context, k, r), where=f"client {client.name}, round {r}")
    site.keep_private(context, k, r, update.private)
    metrics = MetricRecord({"num-examples": client.weight, "train-loss": update.loss})
    upload = to_record(site.method.target_upload(update.private))
    return Message(RecordDict({"arrays": to_record(update.params), "upload": upload, "metrics": metrics}),
                   reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    site = Site.of(context)
    splits = site.eval_splits()
    dev = site.ws.backbone.device
    models = {name: from_record(msg.content[name], dev) for name in MODELS if name in msg.content.array_records}
    acc = {name: [accuracy(site.method, params, split) for split in splits] for name, params in models.items()}
    in_domain = site.in_domain_metrics(context, msg, models) if site.spec.cfg.protocol == "multidomain" else {}
    metrics = MetricRecord({**{f"acc-{k}": v for k, v in acc.items()}, **in_domain,
                            "num-examples": sum(map(len, splits))})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
