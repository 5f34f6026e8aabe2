"""Independent privacy references shared by the test modules (no Opacus, no fedml).

Mironov, Talwar, Zhang 2019 ("Rényi DP of the sampled Gaussian mechanism"), integer orders:
A_α = Σ_{k=0}^{α} C(α,k) (1-q)^{α-k} q^k exp((k²-k) / (2σ²)),  RDP(α) = T·log(A_α) / (α-1),
converted to (ε, δ) as Opacus does (Balle et al. 2020, Thm 21; see
opacus/accountants/analysis/rdp.py get_privacy_spent):
ε = RDP(α) + log((α-1)/α) - (log δ + log α) / (α-1), minimised over α.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_α of Mironov-Talwar-Zhang for integer α (log-sum-exp of the binomial expansion)."""
    terms = [
        math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * sigma**2)
        for k in range(alpha + 1)
    ]  # fmt: skip
    top = max(terms)
    return top + math.log(sum(math.exp(t - top) for t in terms))


def rdp_to_eps(rdp: float, alpha: float, delta: float) -> float:
    """Balle et al. 2020 (Thm 21) conversion, as used by Opacus."""
    return rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)


def eps_integer_orders(sigma: float, q: float, steps: int, delta: float, orders: Iterable[int]) -> float:
    """ε after ``steps`` compositions of the Poisson-subsampled Gaussian (σ, q), best integer order."""
    return min(rdp_to_eps(steps * log_a_int(q, sigma, a) / (a - 1), a, delta) for a in orders)


__all__ = ["log_a_int", "rdp_to_eps", "eps_integer_orders"]
