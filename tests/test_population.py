"""The lazy synthetic shop: the same data as materialising every block, determinism, bounded memory."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch

from fedml.data.ids import IdMap
from fedml.data.population import LazyShop, RoundData
from fedml.data.schema import TIMESTAMP, USER
from fedml.data.split import NO_TEST_ITEM, leave_last_out
from fedml.data.synthetic import SPAN_DAYS, generate_shop, product_ids, shopper_ids
from fedml.federated.aggregation import FedAvg
from fedml.federated.client import LocalTraining
from fedml.federated.rounds import train_federated
from fedml.models.mf import init_item_table

N, N_ITEMS, N_CATEGORIES, BLOCK = 3000, 800, 16, 500
MIB = 2**20


def small_shop(**kwargs) -> LazyShop:
    return LazyShop(N, N_ITEMS, N_CATEGORIES, **{"seed": 7, "block_size": BLOCK, **kwargs})


@pytest.fixture(scope="module")
def materialised():
    """Every block of the small shop as one canonical frame, split by the ordinary leave_last_out."""
    shop = small_shop()
    frame = pd.concat([shop.block(b).frame() for b in range(shop.n_blocks)], ignore_index=True)
    ids = IdMap(users=shopper_ids(N).tolist(), items=product_ids(N_ITEMS).tolist())
    return frame, leave_last_out(frame, ids)


def _rows(data, clients) -> list[list[int]]:
    return [data.of(int(c)).tolist() for c in clients]


def test_round_data_equals_slicing_the_materialised_split(materialised):
    _, split = materialised
    shop = small_shop(max_cached_blocks=2)
    clients = np.random.default_rng(0).choice(N, 400, replace=False)  # unsorted, across all 6 blocks
    rd = shop.round_data(clients)
    assert isinstance(rd, RoundData) and rd.n_users == 400 and rd.n_items == N_ITEMS
    np.testing.assert_array_equal(rd.clients, clients)
    assert [rd.train.of(r).tolist() for r in range(400)] == _rows(split.train, clients)
    assert _rows(rd, clients) == _rows(split.train, clients)  # RoundData.of takes the global index
    np.testing.assert_array_equal(rd.test_items, split.test_items[clients])
    assert all(rd.test_item(int(c)) == split.test_items[c] for c in clients[:20])
    np.testing.assert_array_equal(rd.counts(), split.train.counts()[clients])
    assert rd.train.items.dtype == np.int64 and rd.train.indptr.dtype == np.int64


def test_counts_of_and_test_item_match_the_materialised_split(materialised):
    _, split = materialised
    shop = small_shop(max_cached_blocks=1)
    counts = shop.counts()
    assert counts.dtype == np.int32 and counts.shape == (N,)
    np.testing.assert_array_equal(counts, split.train.counts())
    assert shop.counts() is counts  # cached
    assert (split.test_items != NO_TEST_ITEM).all()  # every synthetic shopper has >= 3 distinct items
    for c in [0, 499, 500, 1777, N - 1]:
        np.testing.assert_array_equal(shop.of(c), split.train.of(c))
        assert shop.test_item(c) == split.test_items[c]
    train, test = shop.train_test(np.array([5, 5, 2999]))  # repeats allowed here
    assert _rows(train, range(3)) == _rows(split.train, [5, 5, 2999])
    np.testing.assert_array_equal(test, split.test_items[[5, 5, 2999]])


def test_blocks_are_frames_like_generate_shops(materialised):
    frame, _ = materialised
    reference = generate_shop(N, N_ITEMS, N_CATEGORIES, seed=7)
    assert list(frame.columns) == list(reference.interactions.columns)
    assert frame.dtypes.equals(reference.interactions.dtypes)
    assert sorted(frame[USER].unique()) == shopper_ids(N).tolist()
    # same catalogue model and seed: same item popularity and categories as generate_shop
    np.testing.assert_array_equal(small_shop().popularity, reference.catalogue["popularity"].to_numpy())
    times = frame[TIMESTAMP].to_numpy()
    assert (times >= pd.Timestamp("2026-01-01", tz="UTC").timestamp()).all()
    assert (np.diff(times)[frame[USER].to_numpy()[1:] == frame[USER].to_numpy()[:-1]] >= 0).all()
    assert times.max() - times.min() <= (SPAN_DAYS + 1) * 86_400
    # similar volume per shopper to the materialised generator
    ratio = len(frame) / len(reference.interactions)
    assert 0.9 < ratio < 1.1


def test_deterministic_whatever_the_order_cache_or_company():
    clients = np.random.default_rng(1).choice(N, 300, replace=False)
    shop = small_shop(max_cached_blocks=1)
    first = _rows(shop.round_data(clients), clients)
    assert _rows(shop.round_data(clients), clients) == first  # again, warm cache
    reversed_rd = shop.round_data(clients[::-1])
    assert _rows(reversed_rd, clients) == first  # other order
    other = small_shop(max_cached_blocks=4)
    other.round_data(np.arange(0, N, 7))  # other clients first: a different cache state
    assert _rows(other.round_data(clients), clients) == first
    assert _rows(small_shop(), clients) == first  # fresh instance, one client at a time
    # a shopper does not depend on the population size: 2,750 shoppers are a prefix of 3,000
    prefix = LazyShop(2750, N_ITEMS, N_CATEGORIES, seed=7, block_size=BLOCK)
    tail = np.arange(2500, 2750)  # the last, partial block of the smaller shop
    assert _rows(prefix.round_data(tail), tail) == _rows(small_shop().round_data(tail), tail)
    # another seed is another population
    assert _rows(LazyShop(N, N_ITEMS, N_CATEGORIES, seed=8, block_size=BLOCK).round_data(clients), clients) != first


def test_only_the_blocks_of_the_clients_are_generated_and_the_cache_is_bounded():
    shop = small_shop(max_cached_blocks=2)
    shop.round_data(np.array([1200, 510, 999, 520]))  # blocks 1 and 2
    assert shop.blocks_generated == 2
    shop.round_data(np.array([501, 1001]))
    assert shop.blocks_generated == 2  # both cached
    shop.round_data(np.array([0, 2999, 1500]))  # blocks 0, 5, 3
    assert shop.blocks_generated == 5
    assert len(shop._cache) == 2
    for c in range(1000, 1100):  # ascending clients through of(): one generation per block
        shop.of(c)
    assert shop.blocks_generated == 6


def test_round_data_contract_errors():
    shop = small_shop()
    rd = shop.round_data([10, 3])
    with pytest.raises(KeyError):
        rd.of(4)
    with pytest.raises(ValueError, match="unique"):
        shop.round_data([3, 3])
    with pytest.raises(IndexError):
        shop.round_data([N])
    with pytest.raises(IndexError):
        shop.of(-1)
    with pytest.raises(IndexError):
        shop.block(shop.n_blocks)
    with pytest.raises(TypeError):
        shop.round_data(np.array([1.0, 2.0]))
    empty = shop.round_data(np.array([], dtype=np.int64))
    assert empty.n_users == 0 and empty.train.nnz == 0 and len(empty.train.indptr) == 1
    with pytest.raises(ValueError):
        LazyShop(10, 5, 8)
    with pytest.raises(ValueError):
        LazyShop(10, 50, 8, block_size=0)


def test_the_round_loop_runs_on_a_lazy_shop_as_on_the_materialised_data():
    shop = LazyShop(600, 120, 6, seed=3, block_size=100, max_cached_blocks=2)
    full, _ = shop.train_test(np.arange(shop.n_users))
    local = LocalTraining(epochs=1, lr=0.3, batch_size=8, negatives=2, l2=1e-4)
    runs = [
        train_federated(
            data,
            init_item_table(120, 4, 0.1, seed=0),
            local,
            FedAvg(),
            rounds=2,
            client_rate=0.1,
            server_lr=1.0,
            seed=0,
        )
        for data in (shop, full)
    ]
    assert torch.equal(runs[0].table.embeddings, runs[1].table.embeddings)
    assert [r.clients for r in runs[0].reports] == [r.clients for r in runs[1].reports]


def _round_peak(n_shoppers: int, clients_per_round: int = 10_000) -> tuple[float, float, RoundData]:
    shop = LazyShop(n_shoppers, 50_000, 200, seed=7)
    clients = np.flatnonzero(np.random.default_rng(0).random(n_shoppers) < clients_per_round / n_shoppers)
    tracemalloc.start()
    try:
        started = time.perf_counter()
        rd = shop.round_data(clients)
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, seconds, rd


def test_one_rounds_memory_does_not_grow_with_the_population():
    peak_100k, _, rd_100k = _round_peak(100_000)
    peak_1m, seconds, rd_1m = _round_peak(1_000_000)  # ~10,000 clients, touching all 100 blocks
    assert 9_000 < rd_1m.n_users < 11_000 and rd_1m.n_items == 50_000
    assert (rd_1m.counts() >= 2).all()
    assert peak_1m < 256 * MIB  # measured ~30 MiB
    assert peak_1m < 1.25 * peak_100k + 16 * MIB  # ten times the shoppers, about the same memory
    assert seconds < 60  # measured ~6 s on 2 cores


def test_counts_streams_a_million_shoppers():
    shop = LazyShop(1_000_000, 50_000, 200, seed=7)
    started = time.perf_counter()
    counts = shop.counts()
    assert time.perf_counter() - started < 60  # measured ~6 s on 2 cores
    assert counts.shape == (1_000_000,) and counts.dtype == np.int32
    assert counts.min() >= 2 and 4 < counts.mean() < 12
