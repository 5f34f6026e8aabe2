"""The federated round loop: sample clients, train them locally, aggregate, update, account.

A round's clients can be trained by two engines that compute the same thing:

* ``reference``: one client at a time, :func:`fedml.federated.client.client_update` (what a
  device runs);
* ``batched``: all clients of a shard as one computation (:mod:`fedml.federated.batched`).

The round's clients can also be split into shards run by a ``shard_runner`` (for example Prefect
tasks on a Dask cluster, see ``flows/``): each shard returns the float64 partial sum of its
clients' scaled deltas and the server finishes the sum (normalisation, DP noise). Local training's
random draws depend only on (seed, round, client), so sharding does not change the result beyond
float64 summation order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

import numpy as np
import torch

from fedml.data.interactions import UserItems
from fedml.data.ragged import Ragged
from fedml.federated.aggregation import PartialSum, RoundAggregate
from fedml.federated.client import LocalTraining, client_update
from fedml.federated.devices import DeviceStore, UserVectors
from fedml.federated.randomness import RoundDraws, draw_round
from fedml.federated.sampling import poisson_sample
from fedml.federated.server_optim import ServerOptimizer, ServerSGD
from fedml.models.mf import ItemTable
from fedml.threads import single_thread

Engine = Literal["reference", "batched"]


class Aggregator(Protocol):
    def accumulate(self, updates: list, n_items: int, dim: int, device: str = "cpu") -> PartialSum: ...
    def accumulate_batched(self, batch, n_items: int, dim: int, device: str = "cpu") -> PartialSum: ...
    def finish(self, partials: list[PartialSum], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate: ...


class Accountant(Protocol):
    def step(self, n: int = 1) -> None: ...
    def epsilon(self, delta: float) -> float: ...


@dataclass
class RoundReport:
    """One round's facts, as logged per round (step = round)."""

    round: int
    clients: int
    examples: int
    loss: float
    update_norm: float
    clipped_fraction: float
    epsilon: float | None
    seconds: float

    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items() if v is not None and k != "round"}


@dataclass
class Shard:
    """The work of some of a round's clients: everything a worker needs, nothing more."""

    table: ItemTable
    positives: Sequence[np.ndarray]  # a Ragged: row i is client i's
    vectors: UserVectors  # the clients' own vectors, where they have one
    draws: RoundDraws  # the shard's clients' draws
    local: LocalTraining
    aggregator: Aggregator
    engine: Engine
    device: str = "cpu"


@dataclass
class ShardResult:
    partial: PartialSum
    losses: np.ndarray  # float64 [clients]: each client's mean local loss
    vectors: torch.Tensor  # [clients, dim]: the clients' new user vectors (they go back to the devices)


def run_shard(shard: Shard) -> ShardResult:
    """Train a shard's clients and accumulate their scaled deltas (runs on a worker)."""
    table, n_items, dim = shard.table.to(shard.device), shard.table.n_items, shard.table.dim
    if shard.engine == "batched":
        from fedml.federated.batched import batched_client_updates  # noqa: PLC0415 (batched imports this module)

        batch, vectors = batched_client_updates(table, shard.positives, shard.vectors, shard.local, shard.draws)
        partial = shard.aggregator.accumulate_batched(batch, n_items, dim, shard.device)
        return ShardResult(partial, np.asarray(batch.losses, dtype=np.float64), vectors)
    updates, vectors = [], []
    with single_thread():
        for i, (positives, draws) in enumerate(zip(shard.positives, shard.draws)):
            update, new_vector = client_update(table, positives, shard.vectors.get(i), shard.local, draws)
            updates.append(update)
            vectors.append(new_vector)
    partial = shard.aggregator.accumulate(updates, n_items, dim, shard.device)
    stacked = torch.stack(vectors) if vectors else torch.zeros(0, dim, dtype=table.embeddings.dtype)
    return ShardResult(partial, np.array([u.loss for u in updates], dtype=np.float64), stacked)


#: runs ``run_shard`` over shards, returning results in the shards' order
ShardRunner = Callable[[Sequence[Shard]], list[ShardResult]]


def run_in_process(shards: Sequence[Shard]) -> list[ShardResult]:
    return [run_shard(shard) for shard in shards]


@dataclass
class FederatedRun:
    table: ItemTable
    reports: list[RoundReport]


def train_federated(
    data: UserItems,
    init: ItemTable,
    local: LocalTraining,
    aggregator: Aggregator,
    *,
    rounds: int,
    client_rate: float,
    server_lr: float,
    seed: int,
    accountant: Accountant | None = None,
    delta: float = 1e-5,
    device: str = "cpu",
    engine: Engine = "batched",
    shards: int = 1,
    shard_runner: ShardRunner = run_in_process,
    on_round: Callable[[RoundReport], None] | None = None,
    server_optimizer: ServerOptimizer | None = None,
) -> FederatedRun:
    """Run ``rounds`` rounds of federated training.

    Every round Poisson-samples clients with rate ``client_rate``, trains each on its own positives
    (``engine``; split into ``shards`` run by ``shard_runner``), aggregates with ``aggregator`` and
    moves the global item table by ``server_lr`` times the aggregate, or by ``server_optimizer``
    (:mod:`fedml.federated.server_optim`) when given (it then owns the rate). The accountant, when given,
    advances once per round and its epsilon at ``delta`` is reported with the round. ``data`` may
    also be a lazily generated population with ``round_data(clients)`` (see
    :mod:`fedml.data.population`): then only the round's clients are materialised.
    """
    rng = np.random.default_rng(seed)
    optimizer = server_optimizer if server_optimizer is not None else ServerSGD(server_lr)
    table = init.to(device).clone()
    devices = DeviceStore()
    reports: list[RoundReport] = []
    counts = np.asarray(data.counts())
    for round_index in range(1, rounds + 1):
        started = time.perf_counter()
        drawn = poisson_sample(data.n_users, client_rate, rng)
        sampled = drawn[counts[drawn] > 0].tolist()  # clients with something to train on
        positives = _round_positives(data, sampled)
        draws = draw_round(seed, round_index, sampled, positives, table.n_items, local.epochs, local.negatives)
        vectors = devices.get_many(sampled, table.dim, table.embeddings.dtype, device)
        bounds = _shard_bounds(len(sampled), shards)
        results = shard_runner(
            [
                Shard(table, positives[lo:hi], vectors[lo:hi], draws[lo:hi], local, aggregator, engine, device)
                for lo, hi in zip(bounds[:-1], bounds[1:])
            ]
        )
        if sampled:
            devices.put_many(sampled, torch.cat([result.vectors.to(device) for result in results]))
        aggregate = aggregator.finish([r.partial for r in results], table.n_items, table.dim, device)
        optimizer.step(table, aggregate.delta_embeddings, aggregate.delta_bias)
        epsilon = None
        if accountant is not None:
            accountant.step()
            epsilon = accountant.epsilon(delta)
        losses = np.concatenate([r.losses for r in results]) if results else np.zeros(0)
        report = RoundReport(
            round=round_index,
            clients=aggregate.num_clients,
            examples=aggregate.num_examples,
            loss=float(losses.mean()) if len(losses) else float("nan"),
            update_norm=aggregate.mean_update_norm,
            clipped_fraction=aggregate.clipped_fraction,
            epsilon=epsilon,
            seconds=time.perf_counter() - started,
        )
        reports.append(report)
        if on_round is not None:
            on_round(report)
    return FederatedRun(table=table.to("cpu"), reports=reports)


def _shard_bounds(n_clients: int, shards: int) -> list[int]:
    """Where each shard's run of the round's clients starts, and the end: ``min(shards, n_clients)``
    runs (at least one) of sizes differing by at most one."""
    parts = max(1, min(shards, n_clients))
    size, extra = divmod(n_clients, parts)
    return [i * size + min(i, extra) for i in range(parts + 1)]


def _round_positives(data: UserItems, clients: list[int]) -> Ragged:
    """The clients' train positives, row ``i`` for ``clients[i]``."""
    rows = np.asarray(clients, dtype=np.int64)
    round_data = getattr(data, "round_data", None)
    if round_data is not None and len(rows):
        train = round_data(rows).train  # one row per client, in the order asked
        return Ragged(train.items, train.indptr)
    if isinstance(data, UserItems):
        return Ragged.from_csr(data.items, data.indptr, rows)
    return Ragged.of([data.of(c) for c in clients])
