"""A round's train exchange through Flower's own SecAgg+ (`federation.secure_aggregation`, docs/federation.md
"Secure aggregation"): its four stages (setup, share keys, collect masked vectors, unmask), Shamir shares,
masks, quantization and pre-scaling by weight are Flower's, unchanged.

Server side, `secure_sum` runs the stages of `SecAggPlusWorkflow` with the two calls it makes on a legacy
Strategy answered by `_Fit`: what each SuperNode trains, and the aggregate the unmask stage hands over (the
weighted mean of the nodes' updates, from sums only). Node side, the ClientApp hands a train message that carries
SecAgg+ configs to Flower's `secaggplus_mod`, which calls the ClientApp's `train_securely` at the masked-vector
stage (`node_work` reads its message, `node_reply` writes its answer: the node's weighted mean over its clients
and their total weight); the mod pre-scales, quantizes and masks that answer before it leaves the node."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState
from flwr.serverapp import Grid

from trip.config import SecAggCfg
from trip.errors import TripError
from trip.methods.base import Tensors

# --- server side ------------------------------------------------------------------------------------------------


@dataclass
class SecureSum:
    """What the server learns from one secure round: the aggregate, and per node only its metrics (the train
    losses of its clients) and its weight."""

    mean: Tensors | None  # None: the protocol halted (`halted` says where), nothing was unmasked
    reports: dict[int, dict] = field(default_factory=dict)  # node id -> its metrics, for the nodes inside the sum
    dropped: dict[int, str] = field(default_factory=dict)  # node id -> why it left the protocol
    halted: str = ""
    shares: int = 0
    threshold: int = 0


def secure_sum(grid: Grid, sa: SecAggCfg, timeout: float, server_round: int, arrays: ArrayRecord,
               work: dict[int, dict]) -> SecureSum:
    """`work`: node id -> the config of its train step (round, lr, its clients). At least two nodes."""
    fit = _Fit(work)
    workflow = SecAggPlusWorkflow(sa.num_shares, sa.reconstruction_threshold, max_weight=sa.max_weight,
                                  clipping_range=sa.clipping_range, quantization_range=sa.quantization_range,
                                  modulus_range=sa.modulus_range, timeout=timeout)
    state = WorkflowState()
    server_state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round}),
                               MAIN_PARAMS_RECORD: arrays})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=server_state, run_config={}),
                            strategy=fit)  # type: ignore[arg-type]  # the two calls the workflow makes
    watched = _Watched(grid, timeout)
    for stage in (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage,
                  workflow.unmask_stage):
        if not stage(watched, context, state):
            return SecureSum(None, dropped=watched.dropped, halted=stage.__name__, shares=state.num_shares,
                             threshold=state.threshold)
    mean = {name: torch.from_numpy(np.asarray(a, np.float32)) for name, a in zip(arrays, fit.aggregate, strict=True)}
    for name, ref in arrays.items():
        if tuple(mean[name].shape) != tuple(ref.shape):
            raise TripError(f"secure aggregation: the aggregate of '{name}' has shape {tuple(mean[name].shape)}, "
                            f"expected {tuple(ref.shape)}: a SuperNode runs another method or trip version")
    return SecureSum(mean, fit.reports, watched.dropped, shares=state.num_shares, threshold=state.threshold)


@dataclass(frozen=True)
class _Node:
    node_id: int  # all the workflow reads of a ClientProxy


class _Fit:
    """The legacy Strategy calls of SecAggPlusWorkflow: `configure_fit` (one FitIns per node) and `aggregate_fit`
    (the unmasked aggregate, the same in every result; each result's metrics and weight are its node's)."""

    def __init__(self, work: dict[int, dict]):
        self.work = work
        self.aggregate: list[np.ndarray] = []
        self.reports: dict[int, dict] = {}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager) -> list[tuple[_Node, FitIns]]:
        return [(_Node(node_id), FitIns(parameters, dict(config))) for node_id, config in self.work.items()]

    def aggregate_fit(self, server_round: int, results: list[tuple[_Node, FitRes]],
                      failures: list) -> tuple[Parameters, dict]:
        aggregate = results[0][1].parameters
        self.aggregate = parameters_to_ndarrays(aggregate)
        self.reports = {node.node_id: dict(res.metrics) for node, res in results}
        return aggregate, {}


class _Watched:
    """The grid the workflow talks through, noting for each node the first stage it failed and why (the
    workflow keeps failures without their node)."""

    def __init__(self, grid: Grid, timeout: float):
        self.grid, self.timeout = grid, timeout
        self.dropped: dict[int, str] = {}

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list[Message]:
        stages = {m.metadata.dst_node_id: m.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE] for m in messages}
        replies = list(self.grid.send_and_receive(list(messages), timeout=timeout))
        by_node = {m.metadata.src_node_id: m for m in replies}
        for node_id, stage in stages.items():
            reply = by_node.get(node_id)
            why = f"no reply within {self.timeout:g} s" if reply is None else \
                reply.error.reason if reply.has_error() else None
            if why is not None:
                self.dropped.setdefault(node_id, f"left secure aggregation at its {stage} stage: {why}")
        return replies


# --- node side ------------------------------------------------------------------------------------------------

def is_secure(msg: Message) -> bool:
    """A train message of one of SecAgg+'s stages (for `secaggplus_mod`)."""
    return RECORD_KEY_CONFIGS in msg.content.config_records


def node_work(msg: Message) -> tuple[dict, Tensors]:
    """The config and the global tensors of a masked-vector stage message, as `secure_sum` sent them."""
    fitins = recorddict_to_fitins(msg.content, keep_input=True)
    names = str(fitins.config["names"]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    return dict(fitins.config), {n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays, strict=True)}


def node_reply(msg: Message, names: list[str], mean: Tensors, weight: int, metrics: dict) -> Message:
    """The node's update as `secaggplus_mod` reads it: its mean in `names` order and its weight (num_examples)."""
    arrays = ndarrays_to_parameters([mean[n].detach().cpu().numpy() for n in names])
    content = fitres_to_recorddict(FitRes(Status(Code.OK, ""), arrays, weight, metrics), keep_input=False)
    return Message(content, reply_to=msg)
