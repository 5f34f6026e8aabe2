"""Local training's random draws (draw_round): a pure function of (seed, round, client).

Orders must be uniformly random permutations of a client's positives per epoch; negatives must be
uniform over the items the client has not interacted with (its complement), never one of its
positives, and plain uniform over the catalogue for a client that owns every item. The frequency
tests compare counts with their expectation under the claimed distribution, with a tolerance taken
from the sample size (a chi-square statistic far in the tail fails; p-values below ~1e-6).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from fedml.federated.randomness import LocalDraws, RoundDraws, client_keys, draw_round

N_ITEMS = 60


def _positives(sizes, n_items: int = N_ITEMS, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_items, size, replace=False)).astype(np.int64) for size in sizes]


SIZES = [5, 0, 1, 30, N_ITEMS - 1, N_ITEMS, 12, 59, 2]  # empty, one free item, every item, ...
CLIENTS = [7, 3, 1000, 0, 42, 2**40, 11, 12, 13]


def _draw(seed=1, round_index=2, clients=CLIENTS, positives=None, n_items=N_ITEMS, epochs=3, negatives=4):
    positives = _positives(SIZES) if positives is None else positives
    return draw_round(seed, round_index, clients, positives, n_items, epochs, negatives)


def _same(a: LocalDraws, b: LocalDraws) -> bool:
    return np.array_equal(a.order, b.order) and np.array_equal(a.negatives, b.negatives)


def _assert_uniform(counts: np.ndarray, p_floor: float = 1e-6) -> None:
    """``counts`` could come from equal cell probabilities: chi-square p-value above ``p_floor``,
    and every cell within 6 binomial standard deviations of its expectation."""
    counts = np.asarray(counts, dtype=np.float64)
    total, cells = counts.sum(), len(counts)
    expected = total / cells
    sd = np.sqrt(total * (1 / cells) * (1 - 1 / cells))
    assert np.all(np.abs(counts - expected) < 6 * sd), (counts, expected, sd)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert stats.chi2.sf(chi2, cells - 1) > p_floor, (chi2, cells)


def test_shapes_dtypes_and_ranges():
    positives = _positives(SIZES)
    draws = _draw(positives=positives, epochs=3, negatives=4)
    assert len(draws) == len(CLIENTS)
    for pos, d in zip(positives, draws):
        assert isinstance(d, LocalDraws)
        assert d.order.shape == (3, len(pos)) and d.order.dtype == np.int64
        assert d.negatives.shape == (3, len(pos), 4) and d.negatives.dtype == np.int64
        if len(pos):
            assert d.negatives.min() >= 0 and d.negatives.max() < N_ITEMS
    assert len(draw_round(1, 2, [], [], N_ITEMS, 3, 4)) == 0


def test_reproducible():
    first, again = _draw(), _draw()
    assert all(_same(a, b) for a, b in zip(first, again))
    # the inputs may be any sequences: lists, arrays
    as_arrays = draw_round(1, 2, np.array(CLIENTS), [p.tolist() for p in _positives(SIZES)], N_ITEMS, 3, 4)
    assert all(_same(a, b) for a, b in zip(first, as_arrays))


def test_a_clients_draws_depend_only_on_seed_round_and_client():
    """Partition independence: alone, among others, in any order, in any shard, the same draws."""
    positives = _positives(SIZES)
    together = _draw(positives=positives)
    for i, client in enumerate(CLIENTS):
        alone = draw_round(1, 2, [client], [positives[i]], N_ITEMS, 3, 4)[0]
        assert _same(alone, together[i]), client
    reverse = list(_draw(clients=CLIENTS[::-1], positives=positives[::-1]))[::-1]
    assert all(_same(a, b) for a, b in zip(together, reverse))
    shuffled = np.random.default_rng(5).permutation(len(CLIENTS))
    mixed = _draw(clients=[CLIENTS[j] for j in shuffled], positives=[positives[j] for j in shuffled])
    for draws, j in zip(mixed, shuffled):
        assert _same(draws, together[j])
    # among other clients with other histories (their sizes shift every flat counter in the batch)
    others = _positives([40, 0, 17, 3], seed=9)
    crowd = draw_round(1, 2, [99, *CLIENTS[:3], 98, 97, *CLIENTS[3:], 96], [others[0], *positives[:3], *others[1:3],
                       *positives[3:], others[3]], N_ITEMS, 3, 4)  # fmt: skip
    assert all(_same(a, b) for a, b in zip([*crowd[1:4], *crowd[6:-1]], together))
    # split into shards the way the round loop splits (np.array_split), each drawn on its own
    for shards in (2, 3, len(CLIENTS)):
        parts = np.array_split(np.arange(len(CLIENTS)), shards)
        sharded = [
            d
            for part in parts
            for d in draw_round(1, 2, [CLIENTS[j] for j in part], [positives[j] for j in part], N_ITEMS, 3, 4)
        ]
        assert all(_same(a, b) for a, b in zip(sharded, together))


def test_draws_change_with_seed_round_and_client():
    positives = _positives([30])
    base = draw_round(1, 2, [7], positives, N_ITEMS, 3, 4)[0]
    for seed, round_index, client in [(2, 2, 7), (1, 3, 7), (1, 2, 8), (0, 2, 7), (1, 1, 7), (1, 2, 6)]:
        other = draw_round(seed, round_index, [client], positives, N_ITEMS, 3, 4)[0]
        # 3 permutations of 30 and 360 negatives out of 30 items: a coincidence is impossible
        assert not np.array_equal(other.order, base.order), (seed, round_index, client)
        assert not np.array_equal(other.negatives, base.negatives), (seed, round_index, client)
    # the keys behind them: distinct per (seed, round, client)
    keys = [client_keys(seed, r, np.arange(200)) for seed in range(3) for r in range(3)]
    assert len(np.unique(np.concatenate(keys))) == 9 * 200
    # the same client id and round under other seeds: independent, not shifted copies
    firsts = {tuple(draw_round(s, 1, [7], positives, N_ITEMS, 1, 1)[0].order[0]) for s in range(50)}
    assert len(firsts) == 50


def test_orders_are_permutations_per_epoch():
    positives = _positives(SIZES)
    for pos, d in zip(positives, _draw(positives=positives, epochs=4)):
        for epoch in range(4):
            np.testing.assert_array_equal(np.sort(d.order[epoch]), np.arange(len(pos)))
        if len(pos) >= 12:  # 12! orders: epochs never repeat by chance
            assert len({tuple(row) for row in d.order}) == 4


def test_orders_are_uniformly_random_permutations():
    # 3 positives: all 3! = 6 orders equally likely, over 4,000 clients x 3 epochs
    n_clients, epochs = 4000, 3
    draws = draw_round(0, 1, np.arange(n_clients), [np.array([4, 9, 20])] * n_clients, N_ITEMS, epochs, 1)
    orders = np.concatenate([d.order for d in draws])  # [12000, 3]
    index = {perm: i for i, perm in enumerate(itertools.permutations(range(3)))}
    counts = np.bincount([index[tuple(row)] for row in orders.tolist()], minlength=6)
    _assert_uniform(counts)
    # 10 positives: each element lands at each position equally often (per epoch, all epochs)
    draws = draw_round(3, 7, np.arange(2000), [np.arange(10) * 5] * 2000, N_ITEMS, 2, 1)
    orders = np.stack([d.order for d in draws])  # [2000, 2, 10]
    for epoch in range(2):
        for position in (0, 4, 9):
            _assert_uniform(np.bincount(orders[:, epoch, position], minlength=10))
    # the two epochs of a client are independent: the first position's pair is uniform over 10 x 10
    pairs = orders[:, 0, 0] * 10 + orders[:, 1, 0]
    _assert_uniform(np.bincount(pairs, minlength=100))


def test_negatives_never_hit_the_clients_positives():
    positives = _positives(SIZES)
    for pos, size, d in zip(positives, SIZES, _draw(positives=positives, epochs=5, negatives=8)):
        if size < N_ITEMS:
            assert not np.isin(d.negatives, pos).any()
    # catalogue edges, runs of consecutive items, and one free item in the middle or at an end
    cases = [
        np.array([0, 1, 2, 3, 58, 59]),
        np.array([0]),
        np.array([59]),
        np.arange(10, 50),
        np.delete(np.arange(N_ITEMS), 30),
        np.arange(1, N_ITEMS),
        np.arange(N_ITEMS - 1),
    ]
    for pos, d in zip(cases, draw_round(4, 1, np.arange(len(cases)), cases, N_ITEMS, 2, 500)):
        free = np.setdiff1d(np.arange(N_ITEMS), pos)
        assert np.isin(d.negatives, free).all()
        if len(free) == 1:
            assert (d.negatives == free[0]).all()
        else:  # at least 1,000 draws: every free item is reached (a miss has probability < 1e-5)
            assert set(np.unique(d.negatives).tolist()) == set(free.tolist())


def test_negatives_are_uniform_over_the_complement():
    # scattered positives including both catalogue ends: 20 free items, 8 x 3 x 100 = 2,400 draws each
    # client; 300 clients with the same history pooled: 720,000 draws
    pos = np.sort(np.concatenate([[0, 59], np.random.default_rng(1).choice(np.arange(1, 59), 38, replace=False)]))
    free = np.setdiff1d(np.arange(N_ITEMS), pos)
    draws = draw_round(6, 3, np.arange(300), [pos] * 300, N_ITEMS, 3, 100)
    flat = np.concatenate([d.negatives.ravel() for d in draws])
    counts = np.bincount(flat, minlength=N_ITEMS)
    assert counts[pos].sum() == 0
    _assert_uniform(counts[free])
    # one client alone: still uniform (2,400 x 5 = 12,000 draws over 20 items)
    single = draw_round(6, 3, [12345], [pos], N_ITEMS, 5, 60)[0].negatives.ravel()
    _assert_uniform(np.bincount(single, minlength=N_ITEMS)[free])
    # a shopper with most of the catalogue: 5 free items of 50
    n_items, most = 50, np.arange(45, dtype=np.int64)
    many = draw_round(0, 1, [1], [most], n_items, 5, 20)[0].negatives.ravel()  # 4,500 draws
    counts = np.bincount(many, minlength=n_items)
    assert counts[:45].sum() == 0
    _assert_uniform(counts[45:])


def test_consecutive_negatives_are_independent():
    # the counter-based stream: each draw and the next are jointly uniform over free x free
    pos = np.arange(0, N_ITEMS, 2)  # 30 positives, the 30 odd items free
    d = draw_round(2, 5, [3], [pos], N_ITEMS, 4, 50)[0].negatives.ravel()  # 6,000 draws
    free_rank = (d - 1) // 2
    _assert_uniform(np.bincount(free_rank[:-1:2] * 30 + free_rank[1::2], minlength=900))
    # and the negatives of one positive's k draws are not all equal (no stuck stream)
    assert all(len(np.unique(row)) > 1 for row in d.reshape(-1, 50))


def test_a_client_owning_every_item_draws_uniformly_over_the_catalogue():
    n_items = 40
    everything = np.arange(n_items, dtype=np.int64)
    d = draw_round(8, 2, [5], [everything], n_items, 3, 100)[0]  # 12,000 draws over 40 items
    assert d.negatives.shape == (3, n_items, 100)
    np.testing.assert_array_equal(np.sort(d.order, axis=1), np.tile(everything, (3, 1)))
    _assert_uniform(np.bincount(d.negatives.ravel(), minlength=n_items))
    # alongside ordinary clients it behaves the same, and they are unaffected
    others = _positives([3, 0, 20], n_items=n_items)
    mixed = draw_round(8, 2, [1, 5, 2, 3], [others[0], everything, *others[1:]], n_items, 3, 100)
    assert _same(mixed[1], d)
    for pos, got in zip([others[0], *others[1:]], [mixed[0], *mixed[2:]]):
        assert not np.isin(got.negatives, pos).any()


def test_clients_without_positives():
    empty = np.array([], dtype=np.int64)
    draws = draw_round(0, 1, [1, 2, 3], [empty, empty, empty], N_ITEMS, 2, 3)
    for d in draws:
        assert d.order.shape == (2, 0) and d.negatives.shape == (2, 0, 3)
        assert d.order.dtype == d.negatives.dtype == np.int64
    # among clients with positives: theirs are unaffected
    pos = _positives([10, 20])
    mixed = draw_round(0, 1, [1, 9, 2, 8], [empty, pos[0], empty, pos[1]], N_ITEMS, 2, 3)
    alone = draw_round(0, 1, [9, 8], pos, N_ITEMS, 2, 3)
    assert _same(mixed[1], alone[0]) and _same(mixed[3], alone[1])
    assert mixed[0].negatives.size == mixed[2].negatives.size == 0
    # zero negatives per positive: empty negatives of the right shape, the same orders
    no_negatives = draw_round(0, 1, [9], [pos[0]], N_ITEMS, 2, 0)[0]
    assert no_negatives.negatives.shape == (2, 10, 0)
    np.testing.assert_array_equal(no_negatives.order, alone[0].order)


@pytest.mark.parametrize("seed", [0, 123456789, 2**63 - 1, -1])
def test_any_64_bit_seed(seed):
    d = draw_round(seed, 10**6, [2**62], [np.array([1, 5])], 8, 2, 3)[0]
    assert not np.isin(d.negatives, [1, 5]).any()
    assert _same(d, draw_round(seed, 10**6, [2**62], [np.array([1, 5])], 8, 2, 3)[0])


def test_a_population_scale_round():
    """2,000 clients of up to 200 positives in a 10,000-item catalogue: one vectorised call."""
    n_items, epochs, k = 10_000, 2, 4
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 200, 2000)
    positives = [np.sort(rng.choice(n_items, s, replace=False)).astype(np.int64) for s in sizes]
    clients = np.sort(rng.choice(10**7, 2000, replace=False))
    draws = draw_round(42, 17, clients, positives, n_items, epochs, k)
    assert len(draws) == 2000
    flat_pos = np.concatenate([c * n_items + p for c, p in enumerate(positives)])
    flat_neg = np.concatenate([c * n_items + d.negatives.ravel() for c, d in enumerate(draws)])
    assert not np.isin(flat_neg, flat_pos).any()
    assert sum(d.negatives.size for d in draws) == int(sizes.sum()) * epochs * k
    for pos, d in zip(positives[:50], draws[:50]):
        np.testing.assert_array_equal(np.sort(d.order, axis=1), np.tile(np.arange(len(pos)), (epochs, 1)))


def test_unsorted_or_repeated_positives_are_refused() -> None:
    good = np.array([2, 7], dtype=np.int64)
    for bad in (np.array([5, 3], dtype=np.int64), np.array([4, 4], dtype=np.int64)):
        with pytest.raises(ValueError, match="sorted and unique"):
            draw_round(0, 1, [0, 1], [good, bad], 10, 1, 2)
    # clients are independent: one client's last item may exceed the next client's first
    draw_round(0, 1, [0, 1, 2], [np.array([8, 9]), np.array([], dtype=np.int64), np.array([1, 2])], 10, 1, 2)


def test_round_draws_slices_and_flat_form():
    """A round's draws: item i is client i's draws, a slice is those clients' draws, and the flat form
    of a list of per-client draws is the same round; the views are read-only."""
    draws = _draw()
    per_client = list(draws)
    assert len(draws) == len(per_client) == len(CLIENTS)
    assert np.array_equal(draws.sizes, SIZES)
    for lo, hi in [(0, 0), (0, 3), (2, 7), (4, len(CLIENTS)), (-3, len(CLIENTS))]:
        part = draws[lo:hi]
        assert isinstance(part, RoundDraws) and len(part) == len(per_client[lo:hi])
        assert all(_same(a, b) for a, b in zip(part, per_client[lo:hi]))
    assert _same(draws[-1], per_client[-1])
    with pytest.raises(IndexError):
        draws[len(CLIENTS)]
    with pytest.raises(ValueError, match="contiguous"):
        draws[::2]
    flat = RoundDraws.of(per_client, epochs=3, k=4)
    assert np.array_equal(flat.starts, draws.starts)
    assert np.array_equal(flat.orders, draws.orders) and np.array_equal(flat.negatives, draws.negatives)
    assert RoundDraws.of(draws, epochs=3, k=4) is draws
    with pytest.raises(ValueError, match="negatives"):
        RoundDraws.of(draws, epochs=3, k=5)
    with pytest.raises(ValueError):
        per_client[0].negatives[0, 0, 0] = 1  # every client's view shares the round's arrays
