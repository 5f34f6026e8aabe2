"""The federated round loop: sample clients, train them locally, aggregate, update, account."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import torch

from fedml.data.interactions import UserItems
from fedml.federated.aggregation import RoundAggregate
from fedml.federated.client import ClientUpdate, LocalTraining, client_update
from fedml.federated.sampling import poisson_sample
from fedml.models.mf import ItemTable
from fedml.threads import single_thread


class Aggregator(Protocol):
    def aggregate(self, updates: list[ClientUpdate], n_items: int, dim: int, device: str = "cpu") -> RoundAggregate: ...


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


class DeviceStore:
    """The shoppers' devices' private state: each client's user vector.

    In simulation this is a dictionary held outside the server's code path: the aggregator and the
    published model never read it, as on a real device.
    """

    def __init__(self) -> None:
        self._vectors: dict[int, torch.Tensor] = {}

    def get(self, client: int) -> torch.Tensor | None:
        return self._vectors.get(client)

    def put(self, client: int, vector: torch.Tensor) -> None:
        self._vectors[client] = vector.detach()

    def __len__(self) -> int:
        return len(self._vectors)


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
    on_round: Callable[[RoundReport], None] | None = None,
) -> FederatedRun:
    """Run ``rounds`` rounds of federated training, one client at a time (the reference path).

    Every round Poisson-samples clients with rate ``client_rate``, runs :func:`client_update` for
    each on its own positives, aggregates with ``aggregator`` and moves the global item table by
    ``server_lr`` times the aggregate. The accountant, when given, advances once per round and its
    epsilon at ``delta`` is reported with the round.
    """
    rng = np.random.default_rng(seed)
    table = init.to(device).clone()
    devices = DeviceStore()
    reports: list[RoundReport] = []
    counts = data.counts()
    for round_index in range(1, rounds + 1):
        started = time.perf_counter()
        sampled = [int(c) for c in poisson_sample(data.n_users, client_rate, rng) if counts[c] > 0]
        updates: list[ClientUpdate] = []
        with single_thread():
            for client in sampled:
                update, vector = client_update(table, data.of(client), devices.get(client), local, rng)
                devices.put(client, vector)
                updates.append(update)
        aggregate = aggregator.aggregate(updates, table.n_items, table.dim, device)
        table.embeddings += server_lr * aggregate.delta_embeddings.to(table.embeddings.dtype)
        table.bias += server_lr * aggregate.delta_bias.to(table.bias.dtype)
        epsilon = None
        if accountant is not None:
            accountant.step()
            epsilon = accountant.epsilon(delta)
        report = RoundReport(
            round=round_index,
            clients=aggregate.num_clients,
            examples=aggregate.num_examples,
            loss=float(np.mean([u.loss for u in updates])) if updates else float("nan"),
            update_norm=aggregate.mean_update_norm,
            clipped_fraction=aggregate.clipped_fraction,
            epsilon=epsilon,
            seconds=time.perf_counter() - started,
        )
        reports.append(report)
        if on_round is not None:
            on_round(report)
    return FederatedRun(table=table.to("cpu"), reports=reports)
