"""A round's shards on a real local Dask cluster (worker processes) give the in-process aggregate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedml.config import load_config
from fedml.data.interactions import UserItems
from fedml.training import train_model

pytestmark = pytest.mark.integration


def clustered(n_users: int = 120, n_items: int = 40, seed: int = 0) -> UserItems:
    rng = np.random.default_rng(seed)
    users, items = [], []
    for user in range(n_users):
        cluster = user % 4
        chosen = rng.choice(10, 6, replace=False) + cluster * 10
        users += [user] * len(chosen)
        items += list(chosen)
    return UserItems.from_pairs(np.array(users), np.array(items), n_users, n_items)


def test_dask_shards_match_the_in_process_run(pipeline_env: Path) -> None:
    from prefect import flow

    from flows.sharding import shard_runner

    data = clustered()
    common = ["model.dim=8", "federated.rounds=3", "federated.client_rate=0.5", "federated.server_lr=20",
              "privacy.dp_fedavg.enabled=true", "privacy.dp_fedavg.noise_multiplier=0.5"]  # fmt: skip
    local = load_config(None, common)
    sharded = load_config(None, common + ["federated.shards=3", "federated.task_runner=dask"])

    @flow(name="sharded-training-test")
    def sharded_training() -> tuple[torch.Tensor, list[int]]:
        with shard_runner(sharded) as runner:
            outcome = train_model(data, sharded, shard_runner=runner)
        return outcome.table.embeddings, [r.clients for r in outcome.rounds]

    in_process = train_model(data, local)
    embeddings, clients = sharded_training()
    assert clients == [r.clients for r in in_process.rounds]
    assert torch.allclose(embeddings, in_process.table.embeddings, atol=1e-5)
    assert not torch.allclose(embeddings, torch.zeros_like(embeddings))
