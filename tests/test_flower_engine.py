"""The Flower-engine benchmark contender runs our client update and our FedAvg, through Flower.

Opt-in: Ray start-up alone costs 10-30 s on a small machine, so the test only runs with
``FEDML_TEST_FLOWER=1``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fedml.data.interactions import UserItems
from fedml.federated.aggregation import FedAvg
from fedml.federated.client import LocalTraining, client_update
from fedml.federated.randomness import draw_round
from fedml.models.mf import init_item_table

pytestmark = pytest.mark.skipif(
    os.environ.get("FEDML_TEST_FLOWER") != "1",
    reason="starts Ray through Flower's simulation engine (10-30 s of start-up); set FEDML_TEST_FLOWER=1 to run",
)

N_USERS, N_ITEMS, DIM = 30, 20, 4
ROUNDS, PER_ROUND, SEED, SERVER_LR = 2, 5, 7, 1.0
LOCAL = LocalTraining(epochs=1, lr=0.2, batch_size=4, negatives=2, l2=1e-4)


def _tiny_data() -> UserItems:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), 5)
    items = rng.integers(0, N_ITEMS, size=users.shape)
    return UserItems.from_pairs(users, items, N_USERS, N_ITEMS)


def test_flower_simulation_runs_our_update_and_fedavg() -> None:
    from bench.flower_engine import run_flower_simulation

    data = _tiny_data()
    init = init_item_table(N_ITEMS, DIM, scale=0.1, seed=1)
    result = run_flower_simulation(
        data, init, LOCAL, rounds=ROUNDS, clients_per_round=PER_ROUND, server_lr=SERVER_LR, seed=SEED,
        num_cpus_per_client=1.0,
    )  # fmt: skip

    assert result.table.embeddings.shape == (N_ITEMS, DIM)
    assert result.table.bias.shape == (N_ITEMS,)
    assert not torch.equal(result.table.embeddings, init.embeddings)
    assert result.client_updates == ROUNDS * PER_ROUND
    assert len(result.seconds_per_round) == ROUNDS
    assert result.seconds_startup is not None and result.seconds_startup > 0
    assert all(len(set(s)) == PER_ROUND for s in result.sampled_partitions)

    # The same work done here, in-process, on the shoppers Flower sampled, gives the same table:
    # the clients' draws depend on (seed, round, shopper) only, whichever engine runs them.
    table = init.clone()
    for round_index, sampled in enumerate(result.sampled_partitions, start=1):
        positives = [data.of(p) for p in sampled]
        draws = draw_round(SEED, round_index, sampled, positives, N_ITEMS, LOCAL.epochs, LOCAL.negatives)
        updates = [client_update(table, pos, None, LOCAL, d)[0] for pos, d in zip(positives, draws)]
        aggregate = FedAvg().aggregate(updates, N_ITEMS, DIM)
        table.embeddings += SERVER_LR * aggregate.delta_embeddings.float()
        table.bias += SERVER_LR * aggregate.delta_bias.float()
    torch.testing.assert_close(result.table.embeddings, table.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(result.table.bias, table.bias, rtol=0, atol=1e-6)
