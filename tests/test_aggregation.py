"""FedAvg and user-level DP-FedAvg against explicit float64 references built by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedml.federated.aggregation import DPFedAvg, FedAvg
from fedml.federated.client import ClientUpdate

N_ITEMS, DIM = 30, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _update(rng: np.random.Generator, num_examples: int, scale: float = 0.05, n_rows: int = 6) -> ClientUpdate:
    rows = np.sort(rng.choice(N_ITEMS, size=n_rows, replace=False))
    return ClientUpdate(
        rows=torch.as_tensor(rows, dtype=torch.int64),
        delta_embeddings=torch.as_tensor(rng.normal(0, scale, (n_rows, DIM)), dtype=torch.float32),
        delta_bias=torch.as_tensor(rng.normal(0, scale, n_rows), dtype=torch.float32),
        num_examples=num_examples,
        loss=0.0,
    )


def _scaled(update: ClientUpdate, factor: float) -> ClientUpdate:
    return ClientUpdate(
        update.rows, update.delta_embeddings * factor, update.delta_bias * factor, update.num_examples, 0.0
    )


def _dense(update: ClientUpdate) -> tuple[np.ndarray, np.ndarray]:
    """The update as a dense float64 [n_items, dim] / [n_items] delta, written row by row."""
    emb, bias = np.zeros((N_ITEMS, DIM)), np.zeros(N_ITEMS)
    for j, row in enumerate(update.rows.tolist()):
        emb[row] += update.delta_embeddings[j].double().numpy()
        bias[row] += float(update.delta_bias[j])
    return emb, bias


def _norm(update: ClientUpdate) -> float:
    emb, bias = _dense(update)
    return math.sqrt(float((emb**2).sum() + (bias**2).sum()))


def _dp(clip: float = 0.1, sigma: float = 0.0, cap: float = 10.0, expected: float = 3.7, seed: int = 0) -> DPFedAvg:
    return DPFedAvg(
        clip_norm=clip,
        noise_multiplier=sigma,
        weight_cap=cap,
        expected_weight=expected,
        generator=torch.Generator().manual_seed(seed),
    )


def _l2(emb: torch.Tensor, bias: torch.Tensor) -> float:
    return math.sqrt(float(emb.double().pow(2).sum() + bias.double().pow(2).sum()))


def test_fedavg_is_the_example_weighted_mean_of_dense_deltas():
    rng = np.random.default_rng(0)
    updates = [_update(rng, n) for n in (3, 10, 1, 6, 25)]
    total = sum(u.num_examples for u in updates)
    ref_emb, ref_bias = np.zeros((N_ITEMS, DIM)), np.zeros(N_ITEMS)
    for u in updates:
        emb, bias = _dense(u)
        ref_emb += u.num_examples / total * emb
        ref_bias += u.num_examples / total * bias
    agg = FedAvg().aggregate(updates, N_ITEMS, DIM)
    assert agg.delta_embeddings.dtype == torch.float64
    np.testing.assert_allclose(agg.delta_embeddings.numpy(), ref_emb, rtol=0, atol=1e-12)
    np.testing.assert_allclose(agg.delta_bias.numpy(), ref_bias, rtol=0, atol=1e-12)
    assert agg.num_clients == 5 and agg.num_examples == total
    assert agg.mean_update_norm == pytest.approx(np.mean([_norm(u) for u in updates]), rel=1e-6)
    # no clients: a zero step
    empty = FedAvg().aggregate([], N_ITEMS, DIM)
    assert empty.num_clients == 0 and not empty.delta_embeddings.any() and not empty.delta_bias.any()


def test_dp_fixed_denominator_is_the_weighted_sum_of_clipped_deltas():
    rng = np.random.default_rng(1)
    clip, cap, expected = 0.1, 10.0, 3.7
    # norms ~ 5.5 * scale (30 coordinates): a mix of clipped and unclipped, weights below and at the cap
    updates = [_update(rng, n, scale=s) for n, s in ((2, 0.01), (10, 0.05), (35, 0.02), (7, 0.2), (1, 0.001))]
    ref_emb, ref_bias, clipped = np.zeros((N_ITEMS, DIM)), np.zeros(N_ITEMS), 0
    for u in updates:
        emb, bias = _dense(u)
        norm = math.sqrt(float((emb**2).sum() + (bias**2).sum()))
        factor = min(1.0, clip / norm)
        clipped += norm > clip
        weight = min(u.num_examples / cap, 1.0)
        ref_emb += weight * factor * emb
        ref_bias += weight * factor * bias
    assert 0 < clipped < len(updates)  # the case mixes both
    agg = _dp(clip, 0.0, cap, expected).aggregate(updates, N_ITEMS, DIM)
    np.testing.assert_allclose(agg.delta_embeddings.numpy(), ref_emb / expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(agg.delta_bias.numpy(), ref_bias / expected, rtol=0, atol=1e-12)
    assert agg.clipped_fraction == pytest.approx(clipped / len(updates))
    assert agg.num_clients == len(updates) and agg.num_examples == sum(u.num_examples for u in updates)
    # the denominator is fixed: half the clients give exactly the sum over that half / expected
    half = _dp(clip, 0.0, cap, expected).aggregate(updates[:2], N_ITEMS, DIM)
    full_minus_rest = (
        agg.delta_embeddings - _dp(clip, 0.0, cap, expected).aggregate(updates[2:], N_ITEMS, DIM).delta_embeddings
    )
    torch.testing.assert_close(half.delta_embeddings, full_minus_rest, atol=1e-12, rtol=0)


def test_dp_clipping_bounds_one_clients_contribution():
    rng = np.random.default_rng(2)
    clip, cap, expected = 0.1, 10.0, 3.7
    ordinary = [
        _update(rng, n, scale=s) for n, s in ((4, 0.005), (12, 0.01), (8, 0.2), (3, 0.002), (20, 0.3), (6, 0.008))
    ]
    ordinary_clipped = sum(_norm(u) > clip for u in ordinary)
    assert ordinary_clipped == 2
    base = _update(rng, 7, scale=1.0, n_rows=10)
    huge = _scaled(base, 1e6 / _norm(base))
    assert _norm(huge) == pytest.approx(1e6, rel=1e-5)
    weight = min(huge.num_examples / cap, 1.0)

    aggregator = _dp(clip, 0.0, cap, expected)
    without = aggregator.aggregate(ordinary, N_ITEMS, DIM)
    with_huge = aggregator.aggregate(ordinary + [huge], N_ITEMS, DIM)
    change = _l2(with_huge.delta_embeddings - without.delta_embeddings, with_huge.delta_bias - without.delta_bias)
    bound = clip * weight / expected
    assert change <= bound * (1 + 1e-9)
    assert change == pytest.approx(bound, rel=1e-6)  # clipped to exactly S, not further
    assert without.clipped_fraction == pytest.approx(ordinary_clipped / len(ordinary))
    assert with_huge.clipped_fraction == pytest.approx((ordinary_clipped + 1) / (len(ordinary) + 1))
    # a shopper's largest possible effect on the round is S / expected_weight, whatever their n_k
    heavy = ClientUpdate(huge.rows, huge.delta_embeddings, huge.delta_bias, 10_000, 0.0)
    with_heavy = aggregator.aggregate(ordinary + [heavy], N_ITEMS, DIM)
    change = _l2(with_heavy.delta_embeddings - without.delta_embeddings, with_heavy.delta_bias - without.delta_bias)
    assert change <= clip / expected * (1 + 1e-9)


@pytest.mark.parametrize("n_k,weight", [(1, 0.1), (5, 0.5), (10, 1.0), (11, 1.0), (500, 1.0)])
def test_dp_capped_weights(n_k, weight):
    cap, expected = 10.0, 2.0
    aggregator = _dp(clip=10.0, sigma=0.0, cap=cap, expected=expected)
    assert aggregator.client_weight(n_k) == pytest.approx(weight)
    update = _update(np.random.default_rng(3), n_k)  # norm << clip: no clipping
    agg = aggregator.aggregate([update], N_ITEMS, DIM)
    emb, bias = _dense(update)
    np.testing.assert_allclose(agg.delta_embeddings.numpy(), weight * emb / expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(agg.delta_bias.numpy(), weight * bias / expected, rtol=0, atol=1e-12)
    assert agg.clipped_fraction == 0.0


def test_dp_zero_update_is_not_clipped():
    zero = ClientUpdate(torch.tensor([1, 2]), torch.zeros(2, DIM), torch.zeros(2), 5, 0.0)
    agg = _dp().aggregate([zero], N_ITEMS, DIM)
    assert agg.clipped_fraction == 0.0 and not agg.delta_embeddings.any()


def test_dp_noise_std_and_reproducibility():
    n_items, dim = 2000, 50  # 100,000 embedding and 2,000 bias coordinates of pure noise
    sigma, clip, expected = 1.3, 0.4, 25.0
    std = sigma * clip / expected
    zeros = [ClientUpdate(torch.arange(k, k + 5), torch.zeros(5, dim), torch.zeros(5), 8, 0.0) for k in range(3)]

    def run(seed: int, updates=zeros):
        return _dp(clip, sigma, 20.0, expected, seed).aggregate(updates, n_items, dim)

    agg = run(seed=123)
    emb = agg.delta_embeddings.numpy().ravel()
    bias = agg.delta_bias.numpy()
    # sample std of N normals: relative standard error ~ 1/sqrt(2N); allow 5 of them
    assert emb.std() == pytest.approx(std, rel=5 / math.sqrt(2 * emb.size))
    assert bias.std() == pytest.approx(std, rel=5 / math.sqrt(2 * bias.size))
    assert abs(emb.mean()) < 5 * std / math.sqrt(emb.size)
    assert abs(bias.mean()) < 5 * std / math.sqrt(bias.size)
    # Gaussian tails: |x| > 3 std has probability 0.0027
    assert np.mean(np.abs(emb) > 3 * std) == pytest.approx(0.0027, abs=0.001)

    again = run(seed=123)
    assert torch.equal(agg.delta_embeddings, again.delta_embeddings)
    assert torch.equal(agg.delta_bias, again.delta_bias)
    other = run(seed=124)
    assert not torch.equal(agg.delta_embeddings, other.delta_embeddings)
    # an empty round is noised just the same (the mechanism runs whatever is sampled)
    empty = run(seed=123, updates=[])
    assert torch.equal(agg.delta_embeddings, empty.delta_embeddings)
    assert empty.num_clients == 0


def test_dp_noise_is_added_to_the_sum_not_per_client():
    n_items, dim = 1000, 20
    sigma, clip, expected = 1.0, 0.5, 4.0
    zeros = [ClientUpdate(torch.arange(k, k + 3), torch.zeros(3, dim), torch.zeros(3), 8, 0.0) for k in range(40)]
    agg = _dp(clip, sigma, 20.0, expected, seed=7).aggregate(zeros, n_items, dim)
    # forty clients, still one draw of std sigma * S on the sum
    assert agg.delta_embeddings.numpy().std() == pytest.approx(sigma * clip / expected, rel=0.05)


def test_dp_fedavg_for_population_uses_the_expected_capped_weight() -> None:
    counts = np.array([0, 1, 5, 20, 3])
    aggregator = DPFedAvg.for_population(
        counts, 0.25, clip_norm=0.1, noise_multiplier=1.0, weight_cap=5.0, generator=torch.Generator().manual_seed(0)
    )
    assert aggregator.expected_weight == pytest.approx(0.25 * (0 + 0.2 + 1 + 1 + 0.6))
    assert aggregator.client_weight(20) == 1.0 and aggregator.client_weight(1) == pytest.approx(0.2)
