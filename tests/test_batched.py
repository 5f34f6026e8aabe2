"""The batched round engine against the one-client-at-a-time reference (client_update, FedAvg,
DP-FedAvg, train_federated): same draws, same uploads, same aggregate, same runs, to float rounding;
and a round split into shards gives the unsharded result."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedml.data.interactions import UserItems
from fedml.federated import batched
from fedml.federated.aggregation import DPFedAvg, FedAvg
from fedml.federated.batched import BatchedUpdate, batched_client_updates
from fedml.federated.client import LocalTraining, client_update
from fedml.federated.randomness import draw_round
from fedml.federated.rounds import run_in_process, train_federated
from fedml.models.mf import ItemTable, init_item_table
from fedml.privacy.accountant import SubsampledGaussianAccountant

N_ITEMS, DIM = 300, 8
SIZES = [1, 5, 40, 100, 0, 33, 64, 7, 32]  # around and across batch_size 32; 0: nothing to train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _table(dtype: torch.dtype = torch.float32, device: str = "cpu") -> ItemTable:
    table = init_item_table(N_ITEMS, DIM, scale=0.3, seed=0)
    bias = torch.randn(N_ITEMS, generator=torch.Generator().manual_seed(1)) * 0.1
    return ItemTable(table.embeddings.to(dtype), bias.to(dtype)).to(device)


def _clients(sizes=SIZES, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(N_ITEMS, size, replace=False)).astype(np.int64) for size in sizes]


def _vectors(n: int, dtype: torch.dtype, device: str = "cpu") -> list[torch.Tensor | None]:
    """Every other client is new (None: starts from its fold-in), the others bring a vector."""
    gen = torch.Generator().manual_seed(7)
    return [None if i % 2 else (torch.randn(DIM, generator=gen) * 0.4).to(dtype).to(device) for i in range(n)]


def _draws(clients, config, seed=5):
    """The round's draws (round 1 of a run with ``seed``; client ids are positions)."""
    return draw_round(seed, 1, np.arange(len(clients)), clients, N_ITEMS, config.epochs, config.negatives)


def _both(table, clients, vectors, config, seed=5):
    """The reference (one client at a time) and the batched engine, from the same draws."""
    draws = _draws(clients, config, seed)
    copies = [(d.order.copy(), d.negatives.copy()) for d in draws]
    reference = [client_update(table, c, v, config, d) for c, v, d in zip(clients, vectors, draws)]
    batch, new_vectors = batched_client_updates(table, clients, vectors, config, draws)
    # neither engine wrote into the draws
    for d, (order, negatives) in zip(draws, copies):
        assert np.array_equal(d.order, order) and np.array_equal(d.negatives, negatives)
    return reference, batch, new_vectors


CONFIGS = [
    LocalTraining(epochs=2, lr=0.5, batch_size=32, negatives=4, l2=1e-3),
    LocalTraining(epochs=3, lr=0.2, batch_size=4, negatives=1, l2=0.05),  # many uneven steps
    LocalTraining(epochs=1, lr=1.0, batch_size=100, negatives=6, l2=0.0),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float64, 1e-11)])
def test_batched_updates_equal_the_reference(config, dtype, atol):
    table = _table(dtype)
    before = table.clone()
    clients = _clients()
    vectors = _vectors(len(clients), dtype)
    vectors_before = [None if v is None else v.clone() for v in vectors]
    reference, batch, new_vectors = _both(table, clients, vectors, config)

    assert len(batch) == len(clients) and len(new_vectors) == len(clients)
    norms = batch.norms()
    assert norms.dtype == torch.float64
    for i, (update, vector) in enumerate(reference):
        # fold-in runs in float32 whatever the table's dtype; a first-time client's start differs
        # by float32 rounding between one fold-in of all new clients and one per client
        atol = atol if vectors[i] is not None else max(atol, 1e-6)
        mine = batch.client(i)
        assert torch.equal(mine.rows, update.rows)  # the same rows, in the same order
        assert torch.equal(batch.owner[batch.offsets[i] : batch.offsets[i + 1]], torch.full_like(update.rows, i))
        assert mine.num_examples == update.num_examples == len(clients[i])
        assert mine.delta_embeddings.dtype == dtype and new_vectors[i].dtype == dtype
        torch.testing.assert_close(mine.delta_embeddings, update.delta_embeddings, atol=atol, rtol=0)
        torch.testing.assert_close(mine.delta_bias, update.delta_bias, atol=atol, rtol=0)
        torch.testing.assert_close(new_vectors[i], vector, atol=atol, rtol=0)
        assert mine.loss == pytest.approx(update.loss, abs=atol)
        assert float(norms[i]) == pytest.approx(update.norm(), abs=atol)
    assert reference[4][0].rows.numel() == 0 and reference[4][0].loss == 0.0  # the empty client
    assert torch.count_nonzero(batch.delta_embeddings.abs().sum(1)) > 0.9 * len(batch.rows)
    # inputs are untouched
    assert torch.equal(table.embeddings, before.embeddings) and torch.equal(table.bias, before.bias)
    for v, v0 in zip(vectors, vectors_before):
        assert (v is None and v0 is None) or torch.equal(v, v0)


def _dp(clip: float, sigma: float) -> DPFedAvg:
    return DPFedAvg(clip, sigma, weight_cap=20.0, expected_weight=3.5, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("group", [1, 2, 4])
def test_a_step_run_as_groups_of_clients_gives_the_same_updates(monkeypatch, group):
    """Clients are independent: one SGD step may run as several batches of clients (CLIENT_GROUP)."""
    table, clients, config = _table(torch.float64), _clients(), CONFIGS[1]
    vectors = _vectors(len(clients), torch.float64)
    whole, whole_vectors = batched_client_updates(table, clients, vectors, config, _draws(clients, config))
    monkeypatch.setattr(batched, "CLIENT_GROUP", group)
    split, split_vectors = batched_client_updates(table, clients, vectors, config, _draws(clients, config))
    assert torch.equal(split.rows, whole.rows) and torch.equal(split.owner, whole.owner)
    torch.testing.assert_close(split.delta_embeddings, whole.delta_embeddings, atol=1e-12, rtol=0)
    torch.testing.assert_close(split.delta_bias, whole.delta_bias, atol=1e-12, rtol=0)
    torch.testing.assert_close(split_vectors, whole_vectors, atol=1e-12, rtol=0)
    np.testing.assert_allclose(split.losses, whole.losses, atol=1e-12)


@pytest.mark.parametrize(
    "make", [FedAvg, lambda: _dp(0.3, 1.0), lambda: _dp(10.0, 0.0)], ids=["fedavg", "dp-noise", "dp-noclip"]
)
def test_batched_aggregate_equals_the_reference(make):
    table = _table()
    clients = _clients()
    reference, batch, _ = _both(table, clients, _vectors(len(clients), torch.float32), CONFIGS[0])
    expected = make().aggregate([u for u, _ in reference], N_ITEMS, DIM)
    got = make().aggregate_batched(batch, N_ITEMS, DIM)
    assert got.delta_embeddings.dtype == torch.float64
    torch.testing.assert_close(got.delta_embeddings, expected.delta_embeddings, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.delta_bias, expected.delta_bias, atol=1e-6, rtol=0)
    assert (
        (got.num_clients, got.num_examples)
        == (expected.num_clients, expected.num_examples)
        == (len(clients), sum(SIZES))
    )
    assert got.mean_update_norm == pytest.approx(expected.mean_update_norm, abs=1e-6)
    assert got.clipped_fraction == expected.clipped_fraction
    if isinstance(make(), DPFedAvg) and make().clip_norm < 1:
        assert 0 < got.clipped_fraction < 1  # some clients were clipped, some not


def test_an_empty_round():
    table = _table()
    batch, vectors = batched_client_updates(table, [], [], CONFIGS[0], _draws([], CONFIGS[0]))
    assert isinstance(batch, BatchedUpdate) and len(batch) == 0 and vectors.shape == (0, DIM)
    assert batch.rows.numel() == 0 and batch.norms().numel() == 0 and batch.clients() == []
    for aggregator in (FedAvg(), _dp(0.3, 0.0)):
        aggregate = aggregator.aggregate_batched(batch, N_ITEMS, DIM)
        assert aggregate.num_clients == 0 and not aggregate.delta_embeddings.any()
    clients = _clients([3])
    with pytest.raises(ValueError):
        batched_client_updates(table, clients, [], CONFIGS[0], _draws(clients, CONFIGS[0]))


@pytest.fixture(scope="module")
def shop() -> UserItems:
    """200 shoppers of 80 items in 4 taste clusters, with 1 to 60 positives each."""
    rng = np.random.default_rng(0)
    users, items = [], []
    for user in range(200):
        size = int(rng.choice([1, 2, 5, 12, 40, 60]))
        cluster = np.arange(20) + (user % 4) * 20
        chosen = rng.choice(np.concatenate([cluster, rng.choice(80, 60, replace=False)]), size, replace=False)
        users += [user] * size
        items += chosen.tolist()
    return UserItems.from_pairs(np.array(users), np.array(items), 200, 80)


LOCAL = LocalTraining(epochs=2, lr=0.5, batch_size=8, negatives=4, l2=1e-4)


def _run(shop, private: bool, *, rounds: int = 4, **kwargs):
    """train_federated on the shop; a fresh aggregator (DP: same noise generator seed) every run."""
    aggregator = DPFedAvg(0.5, 1.0, 5.0, 0.4 * 180.0, torch.Generator().manual_seed(1)) if private else FedAvg()
    accountant = SubsampledGaussianAccountant(1.0, 0.4, "rdp") if private else None
    init = init_item_table(80, DIM, 0.1, seed=0)
    return train_federated(
        shop, init, LOCAL, aggregator, rounds=rounds, client_rate=0.4, server_lr=1.0, seed=2, accountant=accountant,
        **kwargs,
    )  # fmt: skip


def _assert_same_run(got, expected, atol: float = 1e-5) -> None:
    torch.testing.assert_close(got.table.embeddings, expected.table.embeddings, atol=atol, rtol=0)
    torch.testing.assert_close(got.table.bias, expected.table.bias, atol=atol, rtol=0)
    assert len(got.reports) == len(expected.reports)
    for mine, theirs in zip(got.reports, expected.reports):
        assert (mine.round, mine.clients, mine.examples, mine.epsilon) == (
            theirs.round, theirs.clients, theirs.examples, theirs.epsilon
        )  # fmt: skip
        assert mine.loss == pytest.approx(theirs.loss, abs=atol)
        assert mine.update_norm == pytest.approx(theirs.update_norm, abs=atol)
        assert mine.clipped_fraction == theirs.clipped_fraction


@pytest.mark.parametrize("private", [False, True], ids=["fedavg", "dp-fedavg"])
def test_batched_run_equals_the_reference_run(shop, private):
    reference = _run(shop, private, engine="reference")
    batched = _run(shop, private, engine="batched")
    _assert_same_run(batched, reference)
    assert not torch.equal(reference.table.embeddings, init_item_table(80, DIM, 0.1, seed=0).embeddings)
    assert len(reference.reports) == 4 and all(r.clients > 0 for r in reference.reports)
    if private:
        assert any(0 < r.clipped_fraction < 1 for r in reference.reports)
    # the batched engine is the default
    _assert_same_run(_run(shop, private), batched, atol=0)


def _recording_runner(sizes: list[list[int]]):
    """run_in_process, noting the clients per shard of every round."""

    def runner(shards):
        sizes.append([len(s.positives) for s in shards])
        return run_in_process(shards)

    return runner


@pytest.mark.parametrize("private", [False, True], ids=["fedavg", "dp-fedavg-noise"])
def test_sharding_does_not_change_the_run(shop, private):
    """Each shard trains its clients from their own draws and returns a float64 partial sum; the
    server adds the DP noise once, at finish. Shards change nothing but float rounding (summation
    order; one fold-in per shard for first-time clients)."""
    one_sizes, three_sizes, reference_sizes = [], [], []
    one = _run(shop, private, engine="batched", shards=1, shard_runner=_recording_runner(one_sizes))
    three = _run(shop, private, engine="batched", shards=3, shard_runner=_recording_runner(three_sizes))
    reference = _run(shop, private, engine="reference", shards=2, shard_runner=_recording_runner(reference_sizes))
    # the rounds really were split: 1, 3 and 2 shards covering the same clients
    clients = [r.clients for r in one.reports]
    assert [sum(s) for s in one_sizes] == [sum(s) for s in three_sizes] == [sum(s) for s in reference_sizes] == clients
    assert all(len(s) == 1 for s in one_sizes)
    assert all(len(s) == 3 and min(s) > 0 for s in three_sizes)
    assert all(len(s) == 2 and min(s) > 0 for s in reference_sizes)
    _assert_same_run(three, one)
    _assert_same_run(reference, one)
    # (noise per shard would have broken the equalities above.) The noise is there: a noiseless run is far off
    if private:
        quiet = DPFedAvg(0.5, 0.0, 5.0, 0.4 * 180.0, torch.Generator().manual_seed(1))
        init = init_item_table(80, DIM, 0.1, seed=0)
        noiseless = train_federated(shop, init, LOCAL, quiet, rounds=4, client_rate=0.4, server_lr=1.0, seed=2)
        assert (noiseless.table.embeddings - one.table.embeddings).abs().max() > 100 * 1e-5
    # more shards than clients: one client per shard
    many_sizes = []
    many = _run(shop, private, rounds=1, engine="batched", shards=10_000, shard_runner=_recording_runner(many_sizes))
    assert all(size == 1 for size in many_sizes[0]) and len(many_sizes[0]) == many.reports[0].clients
    _assert_same_run(many, _run(shop, private, rounds=1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_updates_on_cuda():
    config = CONFIGS[0]
    clients = _clients()
    cpu_ref, _, _ = _both(_table(), clients, _vectors(len(clients), torch.float32), config)
    table = _table(device="cuda")
    batch, vectors = batched_client_updates(
        table, clients, _vectors(len(clients), torch.float32, "cuda"), config, _draws(clients, config)
    )
    assert batch.delta_embeddings.is_cuda and batch.rows.is_cuda and vectors[0].is_cuda
    for i, (update, vector) in enumerate(cpu_ref):
        mine = batch.client(i)
        assert torch.equal(mine.rows.cpu(), update.rows)
        torch.testing.assert_close(mine.delta_embeddings.cpu(), update.delta_embeddings, atol=1e-5, rtol=0)
        torch.testing.assert_close(vectors[i].cpu(), vector, atol=1e-5, rtol=0)
    got = _dp(0.3, 1.0).aggregate_batched(batch, N_ITEMS, DIM, device="cuda")
    expected = _dp(0.3, 1.0).aggregate([u for u, _ in cpu_ref], N_ITEMS, DIM)
    assert got.delta_embeddings.is_cuda
    torch.testing.assert_close(got.delta_embeddings.cpu(), expected.delta_embeddings, atol=1e-6, rtol=0)
