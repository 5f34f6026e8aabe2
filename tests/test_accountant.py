"""The accountant wrappers against values computed independently of Opacus.

Independent references, written out from the papers (the integer-order closed form and the RDP ->
(ε, δ) conversion live in tests/privacy_reference.py, shared with tests/test_rounds.py):

* Mironov, Talwar, Zhang 2019 ("Rényi DP of the sampled Gaussian mechanism"), integer orders:
  A_α = Σ_{k=0}^{α} C(α,k) (1-q)^{α-k} q^k exp((k²-k) / (2σ²)),  RDP(α) = T·log(A_α) / (α-1).
* The same A_α as the Rényi moment E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α], integrated
  numerically (scipy quad), which also covers fractional orders.
* q = 1: plain Gaussian, RDP(α) = α·T / (2σ²) exactly; and the exact (ε, δ) curve of the Gaussian
  mechanism (Balle & Wang 2018): δ(ε) = Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ), μ = √T/σ.
* RDP -> (ε, δ) as Opacus converts (Balle et al. 2020, Thm 21; see
  opacus/accountants/analysis/rdp.py get_privacy_spent):
  ε = RDP(α) + log((α-1)/α) - (log δ + log α) / (α-1), minimised over α.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import integrate
from scipy.optimize import brentq
from scipy.stats import norm

from fedml.privacy.accountant import (
    SubsampledGaussianAccountant,
    calibrate_noise_multiplier,
    composed_epsilon,
    gaussian_epsilon,
)
from tests.privacy_reference import eps_integer_orders, log_a_int, rdp_to_eps

DELTA = 1e-5
# Opacus's default RDP orders (documented in RDPAccountant); integer 11 is not among them
OPACUS_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
SHARED_INT_ORDERS = [a for a in range(2, 64) if a != 11]


def log_a_numeric(q: float, sigma: float, alpha: float) -> float:
    """log E_{z~N(0,σ²)}[((1-q) + q·exp((2z-1)/(2σ²)))^α] by quadrature (any real α > 1)."""

    def log_f(z):
        mix = np.logaddexp(math.log1p(-q), math.log(q) + (2 * z - 1) / (2 * sigma**2))
        return -(z**2) / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2) + alpha * mix

    zs = np.linspace(-20 * sigma, 20 * sigma + alpha / sigma**2 + 5, 20001)
    values = log_f(zs)
    peak = int(np.argmax(values))
    top = float(values[peak])
    area, _ = integrate.quad(
        lambda z: math.exp(log_f(z) - top), zs[0], zs[-1], points=[zs[peak]], limit=500, epsrel=1e-11
    )
    return top + math.log(area)


def exact_gaussian_eps(sigma: float, steps: int, delta: float) -> float:
    mu = math.sqrt(steps) / sigma
    gap = lambda e: norm.cdf(mu / 2 - e / mu) - math.exp(e) * norm.cdf(-mu / 2 - e / mu) - delta
    return brentq(gap, 0.0, 500.0)


# cases whose best order is >= 4, where integer orders are nearly as good as Opacus's grid
CASES = [(1.0, 0.01, 1000), (2.0, 0.05, 500), (0.7, 0.004, 10_000), (1.1, 256 / 60_000, 14_062)]


@pytest.mark.parametrize("sigma,q,steps", CASES)
def test_rdp_matches_integer_order_closed_form(sigma, q, steps):
    ours = gaussian_epsilon(sigma, q, steps, DELTA, "rdp")
    shared = eps_integer_orders(sigma, q, steps, DELTA, SHARED_INT_ORDERS)
    all_int = eps_integer_orders(sigma, q, steps, DELTA, range(2, 64))
    # Opacus minimises over a superset of the shared integer orders: never worse
    assert ours <= shared * (1 + 1e-9)
    # ... and fractional orders only shave a little off the best integer order
    assert ours >= 0.97 * all_int
    assert ours == pytest.approx(all_int, rel=0.03)


def test_rdp_small_order_case_is_below_integer_orders():
    # σ = 0.8, q = 0.2, 30 rounds: the best order is fractional (2.3), 7% below the best integer
    ours = gaussian_epsilon(0.8, 0.2, 30, DELTA, "rdp")
    all_int = eps_integer_orders(0.8, 0.2, 30, DELTA, range(2, 64))
    assert 0.9 * all_int <= ours <= all_int


@pytest.mark.parametrize("sigma,q,steps", [(0.8, 0.2, 30), (1.0, 0.01, 1000), (2.0, 0.05, 500)])
def test_rdp_matches_numerical_renyi_moment_on_opacus_orders(sigma, q, steps):
    expected = min(rdp_to_eps(steps * log_a_numeric(q, sigma, a) / (a - 1), a, DELTA) for a in OPACUS_ORDERS)
    assert gaussian_epsilon(sigma, q, steps, DELTA, "rdp") == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("sigma,steps", [(1.0, 10), (2.0, 100), (5.0, 1), (0.7, 3)])
def test_full_batch_gaussian(sigma, steps):
    closed_form = min(rdp_to_eps(a * steps / (2 * sigma**2), a, DELTA) for a in OPACUS_ORDERS)
    rdp = gaussian_epsilon(sigma, 1.0, steps, DELTA, "rdp")
    assert rdp == pytest.approx(closed_form, rel=1e-12)
    exact = exact_gaussian_eps(sigma, steps, DELTA)
    prv = gaussian_epsilon(sigma, 1.0, steps, DELTA, "prv")
    # PRV is an upper bound within its eps_error (0.01) of the exact curve; RDP is looser
    assert exact <= prv <= exact + 0.03
    assert exact < rdp


@pytest.mark.parametrize("sigma,q,steps", CASES[:3] + [(0.8, 0.2, 30), (0.8, 0.0127, 158)])
def test_prv_is_tighter_than_rdp_within_a_sensible_factor(sigma, q, steps):
    rdp = gaussian_epsilon(sigma, q, steps, DELTA, "rdp")
    prv = gaussian_epsilon(sigma, q, steps, DELTA, "prv")
    assert 0.7 * rdp <= prv <= rdp


def test_reference_numbers_sigma1_q001_1000_steps():
    # σ = 1, q = 0.01, 1000 steps, δ = 1e-5: RDP 2.1014 (α = 7.8), best integer order 2.1078
    # (α = 8), PRV 1.8384 (values also recorded in STACK.md section 8)
    assert gaussian_epsilon(1.0, 0.01, 1000, DELTA, "rdp") == pytest.approx(2.1014, abs=1e-3)
    assert eps_integer_orders(1.0, 0.01, 1000, DELTA, range(2, 64)) == pytest.approx(2.1078, abs=1e-3)
    assert gaussian_epsilon(1.0, 0.01, 1000, DELTA, "prv") == pytest.approx(1.838, abs=0.01)


def test_published_abadi_et_al_2016_figure():
    # Abadi et al. 2016 (Deep Learning with DP, Sec. 3.1): q = 0.01, σ = 4, δ = 1e-5, E = 100
    # epochs (T = 10,000) gives ε ≈ 1.26 with the moments accountant. Its tail bound
    # ε = min_λ (T·log A_{λ+1} + log(1/δ)) / λ, λ <= 32, reproduces the figure from the closed
    # form; Opacus's conversion (Balle et al. 2020) is tighter.
    sigma, q, steps = 4.0, 0.01, 10_000
    moments = min((steps * log_a_int(q, sigma, lam + 1) + math.log(1 / DELTA)) / lam for lam in range(1, 33))
    assert moments == pytest.approx(1.26, abs=0.005)
    assert gaussian_epsilon(sigma, q, steps, DELTA, "rdp") < moments


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_monotone(accountant):
    eps = lambda sigma, steps: gaussian_epsilon(sigma, 0.02, steps, DELTA, accountant)
    assert eps(1.0, 10) < eps(1.0, 100) < eps(1.0, 1000)
    assert eps(0.7, 300) > eps(1.0, 300) > eps(2.0, 300)
    by_rate_delta = lambda q, delta: gaussian_epsilon(1.0, q, 300, delta, accountant)
    assert by_rate_delta(0.01, DELTA) < by_rate_delta(0.05, DELTA)
    assert by_rate_delta(0.02, 1e-6) > by_rate_delta(0.02, 1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_edge_cases(accountant):
    assert gaussian_epsilon(1.0, 0.1, 0, DELTA, accountant) == 0.0
    assert gaussian_epsilon(1.0, 0.0, 50, DELTA, accountant) == 0.0
    assert gaussian_epsilon(0.0, 0.1, 50, DELTA, accountant) == math.inf
    with pytest.raises(ValueError):
        gaussian_epsilon(-1.0, 0.1, 5, DELTA, accountant)
    with pytest.raises(ValueError):
        gaussian_epsilon(1.0, 1.5, 5, DELTA, accountant)
    with pytest.raises(ValueError):
        gaussian_epsilon(1.0, 0.1, 5, 0.0, accountant)
    with pytest.raises(ValueError):
        gaussian_epsilon(1.0, 0.1, 5, DELTA, "gdp")  # type: ignore[arg-type]


def test_prv_falls_back_to_rdp_where_it_cannot_run():
    # σ = 0.05, q = 0.5, 100 steps: ε ~ 2e4; Opacus's PRV grid would have ~1e8 points
    with pytest.warns(RuntimeWarning, match="PRV accountant not used"):
        prv = gaussian_epsilon(0.05, 0.5, 100, DELTA, "prv")
    assert prv == gaussian_epsilon(0.05, 0.5, 100, DELTA, "rdp")
    # σ = 0.01, q = 1, one step: Opacus raises "Discrete mean differs significantly ..."
    with pytest.warns(RuntimeWarning, match="PRV accountant not used"):
        assert gaussian_epsilon(0.01, 1.0, 1, DELTA, "prv") > 1000
    # a single step at ordinary σ works and is an upper bound of the exact value at q = 1
    assert gaussian_epsilon(5.0, 1.0, 1, DELTA, "prv") >= exact_gaussian_eps(5.0, 1, DELTA)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_accountant_steps_and_epsilon(accountant):
    acc = SubsampledGaussianAccountant(1.0, 0.01, accountant)
    assert acc.steps == 0 and acc.epsilon(DELTA) == 0.0
    acc.step()
    acc.step(499)
    assert acc.steps == 500
    assert acc.epsilon(DELTA) == gaussian_epsilon(1.0, 0.01, 500, DELTA, accountant)
    with pytest.raises(ValueError):
        acc.step(-1)


def test_state_dict_round_trip_through_json():
    acc = SubsampledGaussianAccountant(0.8, 0.2, "prv")
    acc.step(30)
    restored = SubsampledGaussianAccountant.from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.state_dict() == acc.state_dict()
    assert restored.epsilon(DELTA) == acc.epsilon(DELTA)
    restored.step(5)
    assert restored.steps == 35 and acc.steps == 30


@pytest.mark.parametrize(
    "accountant,target,q,steps", [("rdp", 3.0, 0.01, 1000), ("rdp", 8.0, 0.05, 300), ("prv", 3.0, 0.01, 1000)]
)
def test_calibrate_round_trip(accountant, target, q, steps):
    sigma = calibrate_noise_multiplier(target, q, steps, DELTA, accountant)
    eps = gaussian_epsilon(sigma, q, steps, DELTA, accountant)
    assert target - 0.011 <= eps <= target
    # a noticeably smaller σ overspends the budget
    assert gaussian_epsilon(0.97 * sigma, q, steps, DELTA, accountant) > target


def test_calibrate_reference_number_and_prv_needs_less_noise():
    assert calibrate_noise_multiplier(3.0, 0.01, 1000, DELTA, "rdp") == pytest.approx(0.8655, abs=1e-3)
    assert calibrate_noise_multiplier(3.0, 0.01, 1000, DELTA, "prv") < 0.8655


# ---------------------------------------------------------------- composition across runs


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_composing_identical_runs_equals_one_longer_run(accountant):
    # two scheduled runs with the same (σ, q) on one cohort are one run of twice the rounds
    two = composed_epsilon([(1.0, 0.1, 30), (1.0, 0.1, 30)], DELTA, accountant)
    assert two == pytest.approx(gaussian_epsilon(1.0, 0.1, 60, DELTA, accountant), rel=1e-6)
    assert composed_epsilon([(1.0, 0.1, 30)], DELTA, accountant) == pytest.approx(
        gaussian_epsilon(1.0, 0.1, 30, DELTA, accountant), rel=1e-9
    )


def test_full_batch_runs_with_different_sigma_compose_to_the_exact_gaussian():
    # q = 1: Gaussians with σ1, σ2 compose to one Gaussian with μ² = 1/σ1² + 1/σ2² (closed form,
    # Dong, Roth & Su 2019); PRV is within its error above the exact curve, RDP above both
    history = [(2.0, 1.0, 3), (4.0, 1.0, 5)]
    sigma_eff = 1 / math.sqrt(3 / 2.0**2 + 5 / 4.0**2)
    exact = exact_gaussian_eps(sigma_eff, 1, DELTA)
    prv = composed_epsilon(history, DELTA, "prv")
    rdp = composed_epsilon(history, DELTA, "rdp")
    assert exact - 1e-6 <= prv <= exact + 0.011
    assert rdp == pytest.approx(gaussian_epsilon(sigma_eff, 1.0, 1, DELTA, "rdp"), rel=1e-9)
    assert rdp > prv


def test_pure_mechanisms_compose_below_basic_composition():
    # 100 mechanisms of ε = 0.1: basic composition says 10; as (ε²/2)-zCDP each, ρ = 0.5 in all, and
    # ρ-zCDP gives ε <= ρ + 2·sqrt(ρ·log(1/δ)) (Bun & Steinke 2016, Prop. 1.3); the RDP -> (ε, δ)
    # conversion Opacus uses is tighter still
    eps = composed_epsilon([], DELTA, "rdp", pure_epsilons=[0.1] * 100)
    rho = 100 * 0.1**2 / 2
    assert eps <= rho + 2 * math.sqrt(rho * math.log(1 / DELTA))
    assert eps > rho  # and it is not free
    # a single pure mechanism converted through RDP is never better than ε itself
    assert composed_epsilon([], DELTA, "rdp", pure_epsilons=[1.0]) >= 1.0


def test_composition_edge_cases():
    assert composed_epsilon([], DELTA) == 0.0
    assert composed_epsilon([(1.0, 0.1, 0)], DELTA, "prv") == 0.0
    assert composed_epsilon([(0.0, 0.1, 3), (1.0, 0.1, 3)], DELTA) == math.inf
    with pytest.raises(ValueError, match="accountant"):
        composed_epsilon([(1.0, 0.1, 3)], DELTA, "gdp")
    with pytest.raises(ValueError, match="delta"):
        composed_epsilon([(1.0, 0.1, 3)], 0.0)
    # pure mechanisms make PRV fall back to RDP (PRV composes Gaussians only)
    mixed = composed_epsilon([(1.0, 0.1, 30)], DELTA, "prv", pure_epsilons=[0.5])
    assert mixed == composed_epsilon([(1.0, 0.1, 30)], DELTA, "rdp", pure_epsilons=[0.5])
