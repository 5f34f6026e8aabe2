"""Local DP mechanisms: noise scale, flip rates, unbiasedness, reproducibility, statements."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedml.data.interactions import UserItems
from fedml.privacy.local_dp import (
    discrete_laplace_moments,
    flip_probability,
    laplace_ratings,
    laplace_statement,
    randomized_response,
    randomized_response_statement,
    rr_unbiased_counts,
)
from fedml.privacy.statement import PrivacyStatement, compose_pure

LOW, HIGH = 1.0, 5.0


def _unclamped_noise(epsilon: float, n: int, seed: int, resolution: float | None = None) -> np.ndarray:
    """Noise before clamping: widen the range by a margin the noise essentially never reaches,
    keeping the same scale b = (HIGH - LOW) / epsilon (the sensitivity grows with the range, so
    the range *and* epsilon are scaled together)."""
    widen = 200.0
    low, high = LOW - widen, HIGH + widen
    eps_wide = epsilon * (high - low) / (HIGH - LOW)
    rng = np.random.default_rng(seed)
    x = np.full(n, 3.0)
    return laplace_ratings(x, eps_wide, low, high, rng, resolution=resolution) - x


@pytest.mark.parametrize("epsilon", [1.0, 2.0, 4.0])
def test_laplace_noise_has_the_stated_scale(epsilon):
    n = 200_000
    b = (HIGH - LOW) / epsilon
    noise = _unclamped_noise(epsilon, n, seed=1, resolution=0.002)
    # mean |Z| = b and var = 2b² for a Laplace(b); standard errors from the Laplace moments:
    # sd(|Z|) = b, sd(Z²) = sqrt(E Z^4 - (E Z²)²) = sqrt(24 - 4)·b²
    assert abs(np.abs(noise).mean() - b) < 5 * b / math.sqrt(n) + 2e-3 * b
    assert abs(noise.var() - 2 * b * b) < 5 * math.sqrt(20) * b * b / math.sqrt(n) + 4e-3 * b * b
    assert abs(noise.mean()) < 5 * math.sqrt(2) * b / math.sqrt(n)


def test_discrete_laplace_moments_on_a_coarse_grid():
    # half-star grid: the discrete Laplace's exact moments (slightly below b and 2b²)
    epsilon, resolution, n = 2.0, 0.5, 200_000
    noise = _unclamped_noise(epsilon, n, seed=2, resolution=resolution)
    wide_eps = epsilon * (HIGH - LOW + 400) / (HIGH - LOW)
    mean_abs, var = discrete_laplace_moments(wide_eps, LOW - 200, HIGH + 200, resolution)
    b = (HIGH - LOW) / epsilon
    assert mean_abs == pytest.approx(b, rel=0.02) and var == pytest.approx(2 * b * b, rel=0.02)
    assert np.allclose(noise / resolution, np.round(noise / resolution))  # stays on the grid
    assert abs(np.abs(noise).mean() - mean_abs) < 5 * math.sqrt(var / n)
    assert abs(noise.var() - var) < 5 * math.sqrt(20) * var / math.sqrt(n)


def test_laplace_output_is_clamped_reproducible_and_keeps_nan():
    ratings = np.array([1.0, 2.5, 5.0, np.nan, 4.0, 0.2, 7.0] * 1000)
    out = laplace_ratings(ratings, 0.5, LOW, HIGH, np.random.default_rng(3), resolution=0.5)
    present = ~np.isnan(ratings)
    assert np.isnan(out[~present]).all() and not np.isnan(out[present]).any()
    assert out[present].min() >= LOW and out[present].max() <= HIGH
    assert {LOW, HIGH} <= set(out[present])  # heavy noise hits both ends
    assert np.allclose((out[present] - LOW) / 0.5, np.round((out[present] - LOW) / 0.5))
    again = laplace_ratings(ratings, 0.5, LOW, HIGH, np.random.default_rng(3), resolution=0.5)
    assert np.array_equal(out, again, equal_nan=True)
    other = laplace_ratings(ratings, 0.5, LOW, HIGH, np.random.default_rng(4), resolution=0.5)
    assert not np.array_equal(out, other, equal_nan=True)


def test_laplace_rejects_bad_arguments():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        laplace_ratings(np.ones(3), 0.0, LOW, HIGH, rng)
    with pytest.raises(ValueError):
        laplace_ratings(np.ones(3), 1.0, HIGH, LOW, rng)
    with pytest.raises(ValueError):
        laplace_ratings(np.ones(3), 1.0, LOW, HIGH, rng, resolution=0.3)  # 4 / 0.3 not an integer


def _random_user_items(n_users: int, n_items: int, per_user: int, seed: int) -> UserItems:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    items = np.concatenate([rng.choice(n_items, per_user, replace=False) for _ in range(n_users)])
    return UserItems.from_pairs(users, items, n_users, n_items)


def _dense(ui: UserItems) -> np.ndarray:
    m = np.zeros((ui.n_users, ui.n_items), dtype=bool)
    m[ui.users(), ui.items] = True
    return m


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_randomized_response_flip_rates(epsilon):
    ui = _random_user_items(400, 300, 20, seed=0)
    noisy = randomized_response(ui, epsilon, np.random.default_rng(5))
    truth, out = _dense(ui), _dense(noisy)
    p = flip_probability(epsilon)
    assert p == pytest.approx(1 / (1 + math.exp(epsilon)))
    for bits in (truth, ~truth):  # ones flip to zero and zeros to one at the same rate
        n = bits.sum()
        rate = (truth[bits] != out[bits]).mean()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
    # valid CSR: sorted, distinct, in range
    for u in range(noisy.n_users):
        row = noisy.of(u)
        assert np.all(np.diff(row) > 0) and (row.size == 0 or (row[0] >= 0 and row[-1] < ui.n_items))


def test_randomized_response_added_items_are_uniform_over_absent_ones():
    ui = _random_user_items(3000, 50, 10, seed=1)
    noisy = randomized_response(ui, 1.0, np.random.default_rng(6))
    truth, out = _dense(ui), _dense(noisy)
    added = (out & ~truth).sum(0) / (~truth).sum(0)  # per-item rate of 0 -> 1
    p = flip_probability(1.0)
    se = np.sqrt(p * (1 - p) / (~truth).sum(0))
    assert np.all(np.abs(added - p) < 5 * se)


def test_randomized_response_is_reproducible():
    ui = _random_user_items(50, 40, 5, seed=2)
    a = randomized_response(ui, 1.0, np.random.default_rng(7))
    b = randomized_response(ui, 1.0, np.random.default_rng(7))
    c = randomized_response(ui, 1.0, np.random.default_rng(8))
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.items, b.items)
    assert not (np.array_equal(a.indptr, c.indptr) and np.array_equal(a.items, c.items))


def test_rr_unbiased_counts_is_unbiased():
    epsilon, seeds = 1.0, 40
    ui = _random_user_items(300, 60, 6, seed=3)
    truth = ui.item_popularity().astype(float)
    estimates = np.array([
        rr_unbiased_counts(randomized_response(ui, epsilon, np.random.default_rng(s)).item_popularity(),
                           ui.n_users, epsilon)
        for s in range(seeds)
    ])  # fmt: skip
    p_keep = 1 - flip_probability(epsilon)
    var_one = ui.n_users * p_keep * (1 - p_keep) / (2 * p_keep - 1) ** 2  # per item and draw
    se = math.sqrt(var_one / seeds)
    assert np.all(np.abs(estimates.mean(0) - truth) < 4.5 * se)  # 60 items: a 4.5-SE band
    # the average over items is much sharper still
    assert abs(estimates.mean() - truth.mean()) < 4 * se / math.sqrt(ui.n_items)
    assert estimates.var(0, ddof=1).mean() == pytest.approx(var_one, rel=0.25)


def test_statements_and_composition():
    lap, rr = laplace_statement(2.0), randomized_response_statement(4.0)
    for s in (lap, rr):
        assert s.unit == "record" and s.delta == 0.0 and s.accountant == "pure-epsilon"
        assert s.sampling == "none"
    assert lap.mechanism == "local-dp laplace" and rr.mechanism == "local-dp randomized response"
    both = compose_pure([lap, rr])
    assert both.epsilon == 6.0 and both.delta == 0.0 and both.unit == "record"
    assert both.accountant == "pure-epsilon composition"
    assert both.mechanism == "local-dp laplace + local-dp randomized response"
    assert both.describe().startswith("ε = 6 (δ = 0) per record, local-dp laplace + ")


def test_compose_pure_rejects_mixed_or_approximate_statements():
    with pytest.raises(ValueError):
        compose_pure([])
    user_level = PrivacyStatement(1.0, 0.0, "user", "local-dp laplace", "pure-epsilon", "none")
    with pytest.raises(ValueError):
        compose_pure([laplace_statement(1.0), user_level])
    approximate = PrivacyStatement(1.0, 1e-5, "record", "dp-sgd (opacus)", "rdp (opacus)", "none")
    with pytest.raises(ValueError):
        compose_pure([laplace_statement(1.0), approximate])
