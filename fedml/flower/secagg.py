"""Secure aggregation (Flower's SecAgg+) of DP-FedAvg rounds: the server learns only the sum of the uploads.

Under SecAgg+ the server cannot clip or weight an individual update, so both move to the device
(McMahan et al. 2018 with client-side clipping; Flower's ``DifferentialPrivacyClientSideFixedClipping``
is the same design). A SuperNode runs :func:`fedml.federated.client.client_update` for its sampled
shoppers, clips each update to S and weighs it by min(n_k/cap, 1) with :class:`DPFedAvg.accumulate`
(the very code the server uses without SecAgg+), and uploads the **dense** sum of its shoppers'
contributions (``n_items x dim + n_items`` numbers, plus three diagnostics) through
``secaggplus_mod``. The server drives :class:`flwr.server.workflow.SecAggPlusWorkflow` from our own
ServerApp, one round at a time: the workflow's four stages (setup, share keys, collect masked
vectors, unmask) give it the sum, which goes through ``DPFedAvg.finish`` as a
:class:`~fedml.federated.aggregation.PartialSum`: Gaussian noise N(0, σ²S²) on the sum, division by
the fixed q·W, exactly as without SecAgg+.

Quantisation: SecAgg+ sums integers. Every coordinate of a node's upload is bounded by
``m·S`` (m: the node's sampled shoppers this round, each contributing at most S in L2 norm, hence per
coordinate), so the round's clipping range is ``c = max_m · S`` (nothing is ever clipped by the
quantiser) and each coordinate is stochastically rounded to one of ``T`` levels (unbiased, error
< 2c/T per node). ``T`` is 2^22 unless the round has so many nodes that ``nodes · T`` would reach
the 2^32 modulus. :func:`quantization_error_bound` is the bound on the sum's error per coordinate.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedml.federated.aggregation import DPFedAvg, PartialSum
from fedml.federated.client import ClientUpdate, LocalTraining
from fedml.models.mf import ItemTable

MIN_NODES = 3  # a round's SecAgg+ group: at least this many SuperNodes (padded with idle ones, see docs)
MAX_SHARES = 15  # each node's secret is split among at most this many neighbours (itself included)
QUANTIZATION_RANGE = 2**22  # Flower's default number of levels per coordinate
MODULUS = 2**32  # Flower's default (and largest) modulus of the masked sums
LOSS_CAP = 16.0  # a shopper's local loss enters the diagnostic sum as min(loss, LOSS_CAP)
DIAGNOSTICS = 3  # clipped count, sum of clipped norms, sum of capped losses: each in units of S


@dataclass(frozen=True)
class SecAggParams:
    """One round's SecAgg+ settings, for a group of ``nodes`` SuperNodes."""

    nodes: int
    num_shares: int
    threshold: int
    clipping_range: float
    quantization_range: int

    @classmethod
    def for_round(cls, nodes: int, max_shoppers_per_node: int, clip_norm: float) -> SecAggParams:
        if nodes < MIN_NODES:
            raise ValueError(f"a SecAgg+ round needs at least {MIN_NODES} SuperNodes, got {nodes}")
        shares = min(nodes, MAX_SHARES)
        # more than half of the shares: the server never gets both secrets of a node that answered
        threshold = shares // 2 + 1
        levels = min(QUANTIZATION_RANGE, 2 ** int(math.floor(math.log2((MODULUS - 1) / nodes))))
        return cls(nodes, shares, threshold, float(max(1, max_shoppers_per_node) * clip_norm), levels)

    def workflow(self, timeout_s: float) -> SecAggPlusWorkflow:
        return _SecAggPlusWorkflow(
            self.num_shares,
            self.threshold,
            max_weight=1.0,  # every node uploads with weight 1: the workflow's weighted mean times n is the sum
            clipping_range=self.clipping_range,
            quantization_range=self.quantization_range,
            modulus_range=MODULUS,
            timeout=timeout_s,
        )


class _SecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower 1.32's workflow, except that a node that never answers the setup stage leaves the round.

    Flower keeps such a node among the round's "sampled" nodes, so its unmask stage looks for shares
    of that node's secret, which nobody holds (it never shared keys), logs "Not enough shares to
    recover secret in unmask vectors stage" and halts: one SuperNode gone before the round started
    (killed, not yet marked offline) voided every other node's upload. It took no part in the
    protocol (no keys, no masks with anyone), so leaving it out is what it would be had it not been
    asked.
    """

    def setup_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        if not super().setup_stage(grid, context, state):
            return False
        answered = set(state.active_node_ids)
        state.sampled_node_ids = answered
        state.nid_to_neighbours = {n: ns & answered for n, ns in state.nid_to_neighbours.items() if n in answered}
        return self._check_threshold(state)


def quantization_error_bound(nodes: int, clipping_range: float, quantization_range: int) -> float:
    """Largest error of one coordinate of the secure sum: ``nodes`` stochastic roundings of step 2c/T."""
    return nodes * 2.0 * clipping_range / quantization_range


# ---------------------------------------------------------------------------------------------
# The device side


def device_upload(updates: list[ClientUpdate], clip_norm: float, weight_cap: float, n_items: int, dim: int) -> list:
    """What a node puts into the secure sum: its shoppers' clipped, weighted deltas as dense arrays
    (float64 ``[n_items, dim]`` and ``[n_items]``) and three diagnostics in units of S: how many were
    clipped, the sum of their clipped norms, the sum of min(loss, LOSS_CAP) / LOSS_CAP."""
    clipper = DPFedAvg(clip_norm, 0.0, weight_cap, expected_weight=1.0, generator=torch.Generator())
    partial = clipper.accumulate(updates, n_items, dim)
    losses = np.array([min(u.loss, LOSS_CAP) for u in updates], dtype=np.float64)
    diagnostics = np.array(
        [partial.clipped, np.minimum(partial.norms, clip_norm).sum() / clip_norm, losses.sum() / LOSS_CAP]
    )
    return [partial.embeddings.numpy(), partial.bias.numpy(), diagnostics * clip_norm]


@dataclass(frozen=True)
class SecureTrainRequest:
    table: ItemTable
    local: LocalTraining
    seed: int
    round: int
    clients: list[int]
    clip_norm: float
    weight_cap: float


def fit_ins(
    table: ItemTable,
    local: LocalTraining,
    seed: int,
    round_index: int,
    clients: list[int],
    clip_norm: float,
    weight_cap: float,
) -> FitIns:
    """The collect stage's instructions to one node (Flower's legacy FitIns, as SecAgg+ carries them)."""
    config = {
        **asdict(local),
        "seed": int(seed),
        "round": int(round_index),
        "clients": json.dumps([int(c) for c in clients]),  # legacy FitIns configs hold scalars only
        "clip-norm": float(clip_norm),
        "weight-cap": float(weight_cap),
    }
    arrays = [table.embeddings.detach().cpu().numpy(), table.bias.detach().cpu().numpy()]
    return FitIns(ndarrays_to_parameters(arrays), config)


def read_fit_ins(ins: FitIns) -> SecureTrainRequest:
    config = ins.config
    local = LocalTraining(**{name: config[name] for name in LocalTraining.__dataclass_fields__})  # type: ignore[arg-type]
    embeddings, bias = parameters_to_ndarrays(ins.parameters)
    table = ItemTable(torch.from_numpy(embeddings.copy()), torch.from_numpy(bias.copy()))
    clients = [int(c) for c in json.loads(str(config["clients"]))]
    return SecureTrainRequest(
        table, local, int(config["seed"]), int(config["round"]), clients,
        float(config["clip-norm"]), float(config["weight-cap"]),
    )  # fmt: skip


def fit_res(upload: list) -> FitRes:
    return FitRes(Status(Code.OK, ""), ndarrays_to_parameters(upload), num_examples=1, metrics={})


# ---------------------------------------------------------------------------------------------
# The server side


@dataclass
class SecureRound:
    """The Strategy the SecAgg+ workflow calls: ``configure_fit`` hands out this round's instructions,
    ``aggregate_fit`` receives the sum (the only calls the workflow makes)."""

    instructions: list[tuple[GridClientProxy, FitIns]]
    params: SecAggParams
    total: list[np.ndarray] | None = None
    answered_nodes: list[int] = field(default_factory=list)

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[None, dict]:
        n = len(results)
        if n:
            mean = parameters_to_ndarrays(results[0][1].parameters)  # the workflow's mean (weight 1 each)
            self.total = [np.asarray(a, dtype=np.float64) * n for a in mean]
            self.answered_nodes = [proxy.node_id for proxy, _ in results]
        return None, {}


@dataclass
class SecureSum:
    """A round's secure sum as the aggregator's partial sum (None: nobody's), and which shoppers it holds."""

    partial: PartialSum | None
    answered: list[int]
    loss: float
    params: SecAggParams | None

    @property
    def partials(self) -> list[PartialSum]:
        return [] if self.partial is None else [self.partial]


def secure_round(
    grid: Grid,
    context: Context,
    instructions: dict[int, FitIns],
    clients_of: dict[int, list[int]],
    counts: np.ndarray,
    clip_norm: float,
    round_index: int,
    timeout_s: float,
) -> SecureSum:
    """Run one SecAgg+ round over the nodes in ``instructions`` (node -> FitIns) and decode the sum.

    Fewer than :data:`MIN_NODES` nodes: no round is run (nobody answered, as if all had dropped out).
    """
    if len(instructions) < MIN_NODES:
        return SecureSum(None, [], float("nan"), None)
    max_shoppers = max((len(c) for c in clients_of.values()), default=0)
    params = SecAggParams.for_round(len(instructions), max_shoppers, clip_norm)
    proxies = [(GridClientProxy(node, grid, context.run_id), ins) for node, ins in instructions.items()]
    strategy = SecureRound(proxies, params)
    legacy = LegacyContext(context, strategy=strategy)  # type: ignore[arg-type]  # duck-typed Strategy
    legacy.state.config_records["config"] = ConfigRecord({"current_round": round_index})
    legacy.state.array_records["parameters"] = ArrayRecord()
    params.workflow(timeout_s)(grid, legacy)
    return decode_sum(strategy, clients_of, counts, clip_norm)


def decode_sum(
    strategy: SecureRound, clients_of: dict[int, list[int]], counts: np.ndarray, clip_norm: float
) -> SecureSum:
    """The sum's arrays as a :class:`PartialSum`; the counts are public (the inventory), the diagnostics decoded."""
    answered = sorted(c for node in strategy.answered_nodes for c in clients_of.get(node, []))
    n = len(answered)
    if strategy.total is None or not n:
        return SecureSum(None, [], float("nan"), strategy.params)
    embeddings, bias, diagnostics = strategy.total
    clipped, norm_sum, loss_sum = (diagnostics / clip_norm).tolist()  # clipped count, sum of norms / S, of losses / cap
    partial = PartialSum(
        torch.from_numpy(embeddings),
        torch.from_numpy(bias),
        counts[answered].astype(np.int64),
        np.full(n, norm_sum * clip_norm / n),  # only their mean is known: each is a clipped norm (<= S)
        int(round(clipped)),
    )
    return SecureSum(partial, answered, loss_sum * LOSS_CAP / n, strategy.params)
