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

A run can be checkpointed after every round and resumed from it (:func:`round_state`,
``resume=``): the item table, the server optimiser, the devices' vectors (simulation only: real
devices keep their own), the sampling and noise generators, the accountant and the round reports,
so a resumed run computes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch

from fedml.data.interactions import UserItems
from fedml.data.ragged import Ragged
from fedml.federated.aggregation import PartialSum, RoundAggregate
from fedml.federated.client import GramUploads, LocalTraining, client_update
from fedml.federated.devices import DeviceStore, UserVectors
from fedml.federated.randomness import RoundDraws, draw_round
from fedml.federated.sampling import poisson_sample
from fedml.federated.server_optim import ServerOptimizer, ServerSGD
from fedml.models.ease import KIND as EASE
from fedml.models.mf import ItemTable
from fedml.threads import single_thread

Engine = Literal["reference", "batched"]
ENGINES: tuple[str, ...] = ("reference", "batched")


class Aggregator(Protocol):
    def accumulate(self, updates: list, n_items: int, dim: int, device: str = "cpu") -> PartialSum: ...
    def accumulate_batched(self, batch, n_items: int, dim: int, device: str = "cpu") -> PartialSum: ...
    def finish(self, partials: list[PartialSum], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate: ...


class Accountant(Protocol):
    def step(self, n: int = 1) -> None: ...
    def epsilon(self, delta: float) -> float: ...
    @property
    def steps(self) -> int: ...


class Checkpointer(Protocol):
    """Where a run's state goes after each round (e.g. :class:`fedml.checkpoint.CheckpointStore`)."""

    def save(self, state: Mapping[str, Any]) -> None: ...


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
    if shard.engine not in ENGINES:
        raise ValueError(f"unknown federated engine {shard.engine!r} for a shard: expected one of {list(ENGINES)}")
    table, n_items, dim = shard.table.to(shard.device), shard.table.n_items, shard.table.dim
    if shard.local.model == EASE:  # no local training, nothing to batch: each upload is built as it is added
        uploads = GramUploads(shard.positives, n_items)
        partial = shard.aggregator.accumulate(uploads, n_items, dim, shard.device)
        return ShardResult(partial, np.zeros(len(uploads)), shard.vectors.values)
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
    checkpoints: Checkpointer | None = None,
    resume: Mapping[str, Any] | None = None,
) -> FederatedRun:
    """Run ``rounds`` rounds of federated training.

    Every round Poisson-samples clients with rate ``client_rate``, trains each on its own positives
    (``engine``; split into ``shards`` run by ``shard_runner``), aggregates with ``aggregator`` and
    moves the global item table by ``server_lr`` times the aggregate, or by ``server_optimizer``
    (:mod:`fedml.federated.server_optim`) when given (it then owns the rate). The accountant, when given,
    advances once per round and its epsilon at ``delta`` is reported with the round. ``data`` may
    also be a lazily generated population with ``round_data(clients)`` (see
    :mod:`fedml.data.population`): then only the round's clients are materialised.

    ``checkpoints``, when given, saves the run's state (:func:`round_state`) after every round,
    before ``on_round`` reports it. ``resume`` is such a state: the run continues after its round
    (``on_round`` is not called again for the rounds it holds), with the same configuration.
    """
    rng = np.random.default_rng(seed)
    optimizer = server_optimizer if server_optimizer is not None else ServerSGD(server_lr)
    table = init.to(device).clone()
    devices = DeviceStore()
    reports: list[RoundReport] = []
    noise = _noise_generator(aggregator)
    first = 1
    if resume is not None:
        table, devices, reports = _restore(resume, init, rng, optimizer, noise, accountant, rounds, device)
        first = int(resume["round"]) + 1
    counts = np.asarray(data.counts())
    user_dim = 0 if local.model == EASE else table.dim  # EASE devices keep no vector
    for round_index in range(first, rounds + 1):
        started = time.perf_counter()
        drawn = poisson_sample(data.n_users, client_rate, rng)
        sampled = drawn[counts[drawn] > 0].tolist()  # clients with something to train on
        positives = _round_positives(data, sampled)
        draws = draw_round(seed, round_index, sampled, positives, table.n_items, local.epochs, local.negatives)
        vectors = devices.get_many(sampled, user_dim, table.embeddings.dtype, device)
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
        if checkpoints is not None:  # before the round is reported: a checkpoint never lags the ledger
            checkpoints.save(round_state(round_index, table, optimizer, devices, rng, noise, accountant, reports))
        if on_round is not None:
            on_round(report)
    return FederatedRun(table=table.to("cpu"), reports=reports)


def round_state(
    round_index: int,
    table: ItemTable,
    optimizer: ServerOptimizer,
    devices: DeviceStore,
    rng: np.random.Generator,
    noise: torch.Generator | None,
    accountant: Accountant | None,
    reports: Sequence[RoundReport],
) -> dict[str, Any]:
    """Everything a run needs to continue after ``round_index`` (tensors on the CPU, plain values)."""
    return {
        "round": int(round_index),
        "table": {"embeddings": table.embeddings.detach().cpu().clone(), "bias": table.bias.detach().cpu().clone()},
        "optimizer": optimizer.state_dict(),
        "devices": devices.state_dict(),
        "sampling_rng": rng.bit_generator.state,
        "noise_rng": None if noise is None else noise.get_state(),
        "accountant_steps": None if accountant is None else int(accountant.steps),
        "reports": [asdict(r) for r in reports],
    }


def _restore(
    state: Mapping[str, Any],
    init: ItemTable,
    rng: np.random.Generator,
    optimizer: ServerOptimizer,
    noise: torch.Generator | None,
    accountant: Accountant | None,
    rounds: int,
    device: str,
) -> tuple[ItemTable, DeviceStore, list[RoundReport]]:
    """Set the run's generators, optimiser and accountant to ``state``; its table, devices and reports."""
    done = int(state["round"])
    saved = ItemTable(state["table"]["embeddings"], state["table"]["bias"])
    if not 0 < done <= rounds:
        raise ValueError(f"cannot resume after round {done} of a run of {rounds} rounds")
    if saved.embeddings.shape != init.embeddings.shape or saved.embeddings.dtype != init.embeddings.dtype:
        raise ValueError(
            f"cannot resume: the checkpoint's item table is {tuple(saved.embeddings.shape)} "
            f"{saved.embeddings.dtype}, this run's is {tuple(init.embeddings.shape)} {init.embeddings.dtype}"
        )
    if (accountant is None) != (state["accountant_steps"] is None):
        raise ValueError("cannot resume: the checkpoint and this run disagree on whether DP is accounted")
    if (noise is None) != (state["noise_rng"] is None):
        raise ValueError("cannot resume: the checkpoint and this run disagree on a seeded noise generator")
    rng.bit_generator.state = state["sampling_rng"]
    if noise is not None:
        noise.set_state(state["noise_rng"])
    if accountant is not None:
        accountant.step(int(state["accountant_steps"]) - accountant.steps)
    optimizer.load_state_dict(state["optimizer"], device)
    devices = DeviceStore.from_state_dict(state["devices"], device)
    reports = [RoundReport(**r) for r in state["reports"]]
    return saved.to(device).clone(), devices, reports


def _noise_generator(aggregator: Aggregator) -> torch.Generator | None:
    """The seeded noise generator of the aggregator (or of the aggregator it wraps, as ``inner``), whose
    state a checkpoint must carry. None: no noise, or unseeded noise from the OS, which a resumed run
    simply keeps drawing."""
    seen: Any = aggregator
    while seen is not None:
        generator = getattr(seen, "generator", None)
        if isinstance(generator, torch.Generator):
            return generator
        seen = getattr(seen, "inner", None)
    return None


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
