"""Server optimisers (FedAvg's server rate, FedAvgM, FedAdam) and their use in the round loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedml.config import RunConfig, apply_override
from fedml.data.interactions import UserItems
from fedml.federated.aggregation import DPFedAvg, FedAvg
from fedml.federated.client import LocalTraining
from fedml.federated.rounds import train_federated
from fedml.federated.server_optim import ServerAdam, ServerMomentum, ServerSGD, server_optimizer
from fedml.models.mf import ItemTable, init_item_table
from fedml.training import train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOCAL = LocalTraining(epochs=1, lr=0.5, batch_size=8, negatives=2, l2=1e-4)


def _table(n: int = 3, dim: int = 2) -> ItemTable:
    return ItemTable(torch.zeros(n, dim), torch.zeros(n))


def _shop(n_users: int = 60, n_items: int = 20, per_user: int = 5) -> UserItems:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return UserItems.from_pairs(users, items, n_users, n_items)


class _Recording:
    """An aggregator that keeps every round's finished aggregate (what the server optimiser gets)."""

    def __init__(self, inner) -> None:
        self.inner, self.finished = inner, []

    def accumulate(self, *args, **kwargs):
        return self.inner.accumulate(*args, **kwargs)

    def accumulate_batched(self, *args, **kwargs):
        return self.inner.accumulate_batched(*args, **kwargs)

    def finish(self, *args, **kwargs):
        aggregate = self.inner.finish(*args, **kwargs)
        self.finished.append(aggregate)
        return aggregate


def test_sgd_moves_by_lr_times_delta():
    table, delta = _table(), torch.tensor([[1.0, -2.0], [0.0, 0.5], [3.0, 0.0]], dtype=torch.float64)
    ServerSGD(2.0).step(table, delta, torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64))
    assert torch.equal(table.embeddings, (2.0 * delta).float())
    assert torch.equal(table.bias, torch.tensor([2.0, 0.0, -2.0]))


def test_momentum_accumulates_past_deltas():
    table, delta = _table(), torch.ones(3, 2, dtype=torch.float64)
    optimizer = ServerMomentum(lr=0.5, beta1=0.9)
    optimizer.step(table, delta, torch.zeros(3, dtype=torch.float64))
    optimizer.step(table, delta, torch.zeros(3, dtype=torch.float64))
    # x = 0.5 * 1 + 0.5 * (0.9 * 1 + 1)
    assert torch.allclose(table.embeddings, torch.full((3, 2), 0.5 + 0.5 * 1.9))
    assert torch.equal(table.bias, torch.zeros(3))


def test_adam_normalises_each_coordinate():
    """Coordinates whose deltas differ by 1000x move by nearly the same step: the point of FedAdam for
    sparse item rows, which FedAvg's mean dilutes by how few shoppers touch them."""
    table = _table(n=2, dim=1)
    delta = torch.tensor([[1e-1], [1e-4]], dtype=torch.float64)
    optimizer = ServerAdam(lr=0.01, beta1=0.9, beta2=0.99, tau=1e-9)
    optimizer.step(table, delta, torch.zeros(2, dtype=torch.float64))
    first = 0.01 * 0.1 / np.sqrt(0.01)  # lr (1 - b1) d / sqrt((1 - b2) d^2), for any d > 0
    assert table.embeddings[:, 0].tolist() == pytest.approx([first, first], rel=1e-3)
    optimizer.step(table, -delta, torch.zeros(2, dtype=torch.float64))  # m = 0.09 d - 0.1 d: a step back
    assert (table.embeddings[:, 0] < first).all()
    assert torch.equal(table.bias, torch.zeros(2))  # zero deltas: no move


def test_factory_and_its_errors():
    assert isinstance(server_optimizer("sgd", 1.0), ServerSGD)
    assert server_optimizer("momentum", 1.0, beta1=0.5) == ServerMomentum(1.0, 0.5)
    assert server_optimizer("adam", 0.1, beta2=0.9, tau=0.01) == ServerAdam(0.1, 0.9, 0.9, 0.01)
    with pytest.raises(ValueError, match="server_optimizer"):
        server_optimizer("lamb", 1.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="server_lr"):
        server_optimizer("adam", 0.0)
    with pytest.raises(ValueError, match="server_tau"):
        server_optimizer("adam", 0.1, tau=0.0)


def test_round_loop_sgd_optimizer_is_the_server_rate():
    data, init = _shop(), init_item_table(20, 4, 0.1, seed=0)
    common = dict(rounds=3, client_rate=0.5, seed=1)
    plain = train_federated(data, init, LOCAL, FedAvg(), server_lr=5.0, **common)
    explicit = train_federated(data, init, LOCAL, FedAvg(), server_lr=123.0, server_optimizer=ServerSGD(5.0), **common)
    assert torch.equal(plain.table.embeddings, explicit.table.embeddings)
    assert torch.equal(plain.table.bias, explicit.table.bias)


def test_fedadam_under_dp_only_post_processes_the_noised_aggregate():
    """The table after DP-FedAvg + FedAdam is FedAdam replayed on the rounds' noised aggregates alone."""
    data, init = _shop(), init_item_table(20, 4, 0.1, seed=0)
    weights = np.minimum(data.counts() / 5.0, 1.0)
    dp = DPFedAvg(0.5, 1.0, 5.0, float(0.5 * weights.sum()), torch.Generator().manual_seed(3))
    recording = _Recording(dp)
    run = train_federated(data, init, LOCAL, recording, rounds=4, client_rate=0.5, server_lr=1.0, seed=2,
                          server_optimizer=ServerAdam(0.05))  # fmt: skip
    replay, table = ServerAdam(0.05), init.clone()
    for aggregate in recording.finished:
        replay.step(table, aggregate.delta_embeddings, aggregate.delta_bias)
    assert len(recording.finished) == 4
    assert torch.allclose(run.table.embeddings, table.embeddings, atol=1e-6)
    assert torch.allclose(run.table.bias, table.bias, atol=1e-6)
    assert not torch.allclose(run.table.embeddings, init.embeddings)


def test_train_model_reads_the_server_optimizer_from_config():
    data = _shop()
    config = RunConfig()
    for override in ("model.dim=4", "federated.rounds=2", "federated.client_rate=0.5", "federated.server_lr=0.05",
                     "privacy.dp_fedavg.enabled=false", "privacy.audit.enabled=false"):  # fmt: skip
        apply_override(config, override)
    sgd = train_model(data, config).table
    apply_override(config, "federated.server_optimizer=adam")
    adam = train_model(data, config).table
    # Adam's first step moves every touched coordinate by about lr (1 - b1) / sqrt(1 - b2) = 0.05;
    # SGD at 0.05 times a mean delta moves far less
    init = init_item_table(20, 4, config.model.init_scale, config.training.seed)
    assert (adam.embeddings - init.embeddings).abs().max() > 5 * (sgd.embeddings - init.embeddings).abs().max()
