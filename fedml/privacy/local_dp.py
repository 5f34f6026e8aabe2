"""Local differential privacy: shoppers perturb their own data before it leaves the device.

* :func:`laplace_ratings`: each explicit rating gets ε-LDP noise (a discrete Laplace on the rating
  grid, see its docstring for why not the textbook floating-point Laplace).
* :func:`randomized_response`: unary-encoding randomized response on every (shopper, item)
  presence bit of the catalogue; :func:`rr_unbiased_counts` debiases aggregated counts.

Both are pure ε-DP per *record* (one rating, one presence bit). A shopper who differs in k
records is protected at k·ε (basic composition, :func:`~fedml.privacy.statement.compose_pure`).

Randomness: ``rng`` is a seeded ``numpy.random.Generator`` (reproducible) or any
:class:`~fedml.privacy.secure_noise.NoiseSource`; pass :class:`~fedml.privacy.secure_noise.SecureNoise`
in production so that nobody holding the run's seed can replay the noise.
"""

from __future__ import annotations

import math

import numpy as np

from fedml.data.interactions import UserItems
from fedml.privacy.secure_noise import NoiseSource, as_noise_source
from fedml.privacy.statement import PrivacyStatement

_GRID_STEPS = 1000  # default rating grid: (high - low) / 1000


def laplace_ratings(
    ratings: np.ndarray,
    epsilon: float,
    low: float,
    high: float,
    rng: np.random.Generator | NoiseSource,
    *,
    resolution: float | None = None,
) -> np.ndarray:
    """ε-LDP ratings: Laplace-type noise of scale ``b = (high - low) / epsilon``, clamped to
    ``[low, high]``.

    Floating-point caveat (Mironov 2012, "On significance of the least significant bits for
    differential privacy"): the textbook sampler ``x + b·ln(U)`` on doubles cannot output every
    double, and *which* doubles it can output depends on ``x``; an attacker can tell inputs apart
    from the low-order bits, so the ε guarantee fails. Mitigation used here: the **discrete
    Laplace mechanism on a grid**. Inputs are clamped to ``[low, high]`` and snapped to the grid
    ``low + k·resolution`` (default ``resolution = (high - low) / 1000``; pass the rating scale's
    own step, e.g. 0.5 stars, to stay on it), then integer noise ``Z`` with
    ``P(Z = z) ∝ exp(-|z|·resolution / b)`` is added to ``k`` (Z is a difference of two i.i.d.
    geometric draws), and the result is clamped to the grid's ends (post-processing). The
    sensitivity is ``(high - low) / resolution`` grid steps, so this is ε-DP, and every output is a
    grid point reachable from every input: no support leak. The residual caveat is that numpy's
    geometric sampler uses floating point, so the probabilities (not the support) are only
    accurate to ~1e-16 relative (so are those of the inversion sampler of
    :class:`~fedml.privacy.secure_noise.SecureNoise`, whose bits come from the OS CSPRNG); an exact
    sampler (Canonne, Kamath, Steinke 2020) would remove that.
    As ``resolution -> 0`` the noise tends to a continuous Laplace(b): mean |Z| ≈ b, var ≈ 2b².

    NaN entries (no explicit rating) stay NaN.
    """
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if not high > low:
        raise ValueError(f"need low < high, got [{low}, {high}]")
    resolution = (high - low) / _GRID_STEPS if resolution is None else float(resolution)
    n_steps = _grid_steps(low, high, resolution)
    ratings = np.asarray(ratings, dtype=np.float64)
    present = ~np.isnan(ratings)
    k = np.rint((np.clip(ratings[present], low, high) - low) / resolution).astype(np.int64)
    noisy = np.clip(k + _discrete_laplace(epsilon / n_steps, k.shape, as_noise_source(rng)), 0, n_steps)
    out = np.full(ratings.shape, np.nan)
    out[present] = np.minimum(low + noisy * resolution, high)
    return out


def discrete_laplace_moments(epsilon: float, low: float, high: float, resolution: float) -> tuple[float, float]:
    """(mean |noise|, variance) in rating units, before clamping, of :func:`laplace_ratings`."""
    a = epsilon / _grid_steps(low, high, resolution)
    r = math.exp(-a)
    mean_abs = 2 * r / (1 - r * r)
    var = 2 * r / (1 - r) ** 2
    return mean_abs * resolution, var * resolution**2


def randomized_response(user_items: UserItems, epsilon: float, rng: np.random.Generator | NoiseSource) -> UserItems:
    """Unary-encoding randomized response on every (shopper, item) bit: keep each bit with
    probability ``e^ε / (1 + e^ε)``, flip it with ``1 / (1 + e^ε)``.

    Never builds the ``n_users x n_items`` matrix: per shopper, each true item is dropped with the
    flip probability, and ``Binomial(n_items - |H|, p_flip)`` items chosen uniformly among the
    absent ones are added.
    """
    p_flip = flip_probability(epsilon)
    noise = as_noise_source(rng)
    n_items = user_items.n_items
    counts = user_items.counts()
    keep = noise.uniform(user_items.nnz) >= p_flip
    n_added = noise.binomial(n_items - counts, p_flip)
    rows: list[np.ndarray] = []
    for user in range(user_items.n_users):
        start, stop = user_items.indptr[user], user_items.indptr[user + 1]
        history = user_items.items[start:stop]
        added = _uniform_absent(np.sort(history), n_items, int(n_added[user]), noise)
        rows.append(np.concatenate([history[keep[start:stop]], added]))
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    users = np.repeat(np.arange(user_items.n_users, dtype=np.int64), lengths)
    items = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return UserItems.from_pairs(users, items, user_items.n_users, n_items)


def rr_unbiased_counts(noisy_counts: np.ndarray, n_users: int, epsilon: float) -> np.ndarray:
    """Unbiased estimate of each item's true count from its count after :func:`randomized_response`.

    ``E[noisy] = c·p + (n - c)·(1 - p)`` with ``p = e^ε / (1 + e^ε)``, so
    ``ĉ = (noisy - n·(1 - p)) / (2p - 1)``; its variance is ``n·p·(1 - p) / (2p - 1)²``.
    """
    p_flip = flip_probability(epsilon)
    noisy = np.asarray(noisy_counts, dtype=np.float64)
    return (noisy - n_users * p_flip) / (1.0 - 2.0 * p_flip)


def flip_probability(epsilon: float) -> float:
    """``1 / (1 + e^ε)``: the probability that randomized response flips one bit."""
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    return 1.0 / (1.0 + math.exp(epsilon))


def laplace_statement(epsilon: float) -> PrivacyStatement:
    """The guarantee of :func:`laplace_ratings`: pure ε-LDP per rating."""
    return _pure_record_statement(epsilon, "local-dp laplace")


def randomized_response_statement(epsilon: float) -> PrivacyStatement:
    """The guarantee of :func:`randomized_response`: pure ε-LDP per (shopper, item) bit."""
    return _pure_record_statement(epsilon, "local-dp randomized response")


def _pure_record_statement(epsilon: float, mechanism: str) -> PrivacyStatement:
    return PrivacyStatement(
        epsilon=float(epsilon),
        delta=0.0,
        unit="record",
        mechanism=mechanism,
        accountant="pure-epsilon",
        sampling="none",
    )


def _grid_steps(low: float, high: float, resolution: float) -> int:
    if not resolution > 0:
        raise ValueError(f"resolution must be > 0, got {resolution}")
    steps = (high - low) / resolution
    n = int(round(steps))
    if n < 1 or abs(steps - n) > 1e-6 * max(1.0, steps):
        raise ValueError(f"(high - low) / resolution must be a positive integer, got {steps}")
    return n


def _discrete_laplace(a: float, shape: tuple[int, ...], noise: NoiseSource) -> np.ndarray:
    """Integer noise with ``P(Z = z) ∝ exp(-a·|z|)``: difference of two geometric variables."""
    p = -math.expm1(-a)  # 1 - e^{-a}, success probability of each geometric draw
    return noise.geometric(p, shape) - noise.geometric(p, shape)


def _uniform_absent(history: np.ndarray, n_items: int, k: int, noise: NoiseSource) -> np.ndarray:
    """``k`` distinct items drawn uniformly from those not in the sorted ``history``."""
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = noise.choice_without_replacement(n_items - len(history), k)
    # the r-th absent item is r + #{h in history : h - (its position) <= r}
    shifted = history - np.arange(len(history))
    return ranks + np.searchsorted(shifted, ranks, side="right")


__all__ = [
    "laplace_ratings",
    "discrete_laplace_moments",
    "randomized_response",
    "rr_unbiased_counts",
    "flip_probability",
    "laplace_statement",
    "randomized_response_statement",
]
