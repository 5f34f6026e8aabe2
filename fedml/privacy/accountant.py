"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-FedAvg rounds, DP-SGD steps).

Thin wrappers over Opacus's accountants (imported lazily, so importing this module stays cheap):

* ``"rdp"``: :class:`opacus.accountants.RDPAccountant` (Mironov et al. 2019 RDP of the sampled
  Gaussian, converted to (ε, δ) with Balle et al. 2020, Thm 21), over Opacus's default orders.
* ``"prv"``: :class:`opacus.accountants.PRVAccountant` (Gopi et al. 2021): numerical composition of
  privacy-loss distributions; tighter than RDP. It returns an *upper* bound, estimate + ``eps_error``
  (0.01 here, absolute), so at tiny ε that error dominates.

Edge cases are handled here rather than in Opacus: no steps (or ``sample_rate == 0``) gives ε = 0;
``noise_multiplier == 0`` gives ε = inf. The PRV discretisation grid grows like
``ε_RDP · sqrt(steps) / eps_error``; at very large ε (tiny σ) it runs for minutes or fails
("Discrete mean differs significantly ..."). When the grid would be too large, or Opacus raises,
the PRV path falls back to the (looser, still valid) RDP bound with a warning.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Literal

AccountantName = Literal["rdp", "prv"]
GaussianRun = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps) of one mechanism

PRV_EPS_ERROR = 0.01  # absolute error of the PRV epsilon estimate (Opacus's default)
PRV_MAX_GRID = 10_000_000  # discretisation points above which the PRV path falls back to RDP


class SubsampledGaussianAccountant:
    """ε of ``steps`` compositions of a Poisson-subsampled Gaussian mechanism with fixed σ and q."""

    def __init__(self, noise_multiplier: float, sample_rate: float, accountant: AccountantName = "rdp") -> None:
        _check_params(noise_multiplier, sample_rate, accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.accountant = accountant
        self._steps = 0

    def step(self, n: int = 1) -> None:
        """Record ``n`` more rounds/steps of the mechanism."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self._steps += int(n)

    @property
    def steps(self) -> int:
        return self._steps

    def epsilon(self, delta: float) -> float:
        """ε spent so far at this δ (0.0 before any step, inf without noise)."""
        return gaussian_epsilon(self.noise_multiplier, self.sample_rate, self._steps, delta, self.accountant)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state, for checkpoints."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "accountant": self.accountant,
            "steps": self._steps,
        }

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> SubsampledGaussianAccountant:
        acc = cls(float(d["noise_multiplier"]), float(d["sample_rate"]), d["accountant"])
        acc.step(int(d["steps"]))
        return acc

    def __repr__(self) -> str:
        return (
            f"SubsampledGaussianAccountant(noise_multiplier={self.noise_multiplier}, "
            f"sample_rate={self.sample_rate}, accountant={self.accountant!r}, steps={self._steps})"
        )


def gaussian_epsilon(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """ε after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism (σ, q), at ``delta``."""
    _check_params(noise_multiplier, sample_rate, accountant)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if steps == 0 or sample_rate == 0.0:
        return 0.0
    if noise_multiplier == 0.0:
        return math.inf
    return _epsilon(noise_multiplier, sample_rate, steps, delta, accountant, warn=True)


@functools.lru_cache(maxsize=64)  # pure; the ledger's plan and DP-SGD training ask for the same σ
def calibrate_noise_multiplier(
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantName = "rdp",
) -> float:
    """Smallest σ (within Opacus's bisection tolerance of 0.01 in ε) whose ε after ``steps`` is
    ``<= target_epsilon``.

    RDP uses :func:`opacus.accountants.utils.get_noise_multiplier`; PRV runs the same search over
    the guarded PRV epsilon (so that probing a very small σ cannot stall Opacus's PRV accountant),
    started from the RDP-calibrated σ.
    """
    _check_params(1.0, sample_rate, accountant)
    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
    if steps <= 0 or sample_rate == 0.0:
        raise ValueError("calibration needs steps > 0 and sample_rate > 0")
    if accountant == "rdp":
        from opacus.accountants.utils import get_noise_multiplier

        with _quiet_rdp():
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant="rdp",
                )
            )
    # PRV is tighter than RDP, so the RDP-calibrated σ is a feasible start
    start = calibrate_noise_multiplier(target_epsilon, sample_rate, steps, delta, "rdp")
    return _bisect_sigma(
        lambda s: _epsilon(s, sample_rate, steps, delta, accountant, warn=False), target_epsilon, start
    )


def _check_params(noise_multiplier: float, sample_rate: float, accountant: str) -> None:
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    if not noise_multiplier >= 0.0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0.0 <= sample_rate <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate}")


class _quiet_rdp(warnings.catch_warnings):
    """Silence Opacus's "Optimal order is the largest/smallest alpha" notice (the bound is valid)."""

    def __enter__(self) -> Any:
        out = super().__enter__()
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return out


def _epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str, warn: bool
) -> float:
    history = [(noise_multiplier, sample_rate, steps)]
    rdp = _rdp_epsilon(history, delta)
    if accountant == "rdp":
        return rdp
    return _prv_epsilon(history, delta, rdp, warn)


def composed_epsilon(
    history: list[GaussianRun],
    delta: float,
    accountant: AccountantName = "rdp",
    pure_epsilons: tuple[float, ...] | list[float] = (),
) -> float:
    """ε at ``delta`` of running several mechanisms on the same data, one after another.

    ``history`` lists Poisson-subsampled Gaussian mechanisms as (σ, q, steps), possibly with
    different σ and q (e.g. one entry per training run of a cohort); ``pure_epsilons`` adds pure
    ε-DP mechanisms. Composition happens in the accountant's own currency (summed RDP curves, or
    composed privacy-loss distributions), which is much tighter than adding ε's. A pure ε-DP
    mechanism enters RDP as ``min(ε, α ε² / 2)`` at order α (it is (ε²/2)-zCDP: Bun & Steinke
    2016, Prop. 3.3); PRV composes Gaussians only, so with pure mechanisms it falls back to RDP.
    """
    if accountant not in ("rdp", "prv"):
        raise ValueError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    for sigma, q, steps in history:
        _check_params(sigma, q, accountant)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
    if any(not e >= 0.0 for e in pure_epsilons):
        raise ValueError(f"pure epsilons must be >= 0, got {list(pure_epsilons)}")
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0.0]
    pure = [float(e) for e in pure_epsilons if e > 0.0]
    if any(s == 0.0 for s, _, _ in history) or any(math.isinf(e) for e in pure):
        return math.inf
    if not history and not pure:
        return 0.0
    rdp = _rdp_epsilon(history, delta, pure)
    if accountant == "rdp" or pure:
        return rdp
    return _prv_epsilon(history, delta, rdp, warn=True)


def _rdp_epsilon(history: list[GaussianRun], delta: float, pure: list[float] | None = None) -> float:
    import numpy as np
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = RDPAccountant.DEFAULT_ALPHAS
    curve = np.zeros(len(orders))
    for sigma, q, steps in history:
        curve += np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders))
    for eps in pure or []:
        curve += np.minimum(eps, np.asarray(orders) * eps**2 / 2)
    with _quiet_rdp():
        epsilon, _ = get_privacy_spent(orders=orders, rdp=curve, delta=delta)
    return float(epsilon)


def _prv_grid_size(history: list[GaussianRun], delta_error: float) -> float:
    """Number of points Opacus's PRV accountant would discretise on (mirrors PRVAccountant)."""
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in history]
    steps = [n for _, _, n in history]
    with _quiet_rdp():
        half_width = compute_safe_domain_size(prvs, steps, PRV_EPS_ERROR, delta_error)
    mesh = PRV_EPS_ERROR / math.sqrt(sum(steps) * math.log(12 / delta_error) / 2)
    return 2 * half_width / mesh


def _prv_epsilon(history: list[GaussianRun], delta: float, rdp_epsilon: float, warn: bool) -> float:
    from opacus.accountants import PRVAccountant

    delta_error = delta / 1000  # Opacus's default
    reason = None
    if not math.isfinite(rdp_epsilon):
        reason = "the RDP bound is infinite"
    elif (size := _prv_grid_size(history, delta_error)) > PRV_MAX_GRID:
        reason = f"its grid would have {size:.3g} points (ε is very large)"
    else:
        import numpy as np

        acc = PRVAccountant()
        acc.history = list(history)
        try:
            with _quiet_rdp(), np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                eps = float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR, delta_error=delta_error))
            if math.isfinite(eps) and eps >= 0.0:
                return eps
            reason = f"it returned {eps}"
        except (RuntimeError, ValueError, FloatingPointError, OverflowError, MemoryError) as exc:
            reason = f"it failed: {exc}"
    if warn:
        warnings.warn(
            f"PRV accountant not used for the history {history}: "
            f"{reason}; reporting the RDP bound ε={rdp_epsilon:.4g} instead",
            RuntimeWarning,
            stacklevel=4,
        )
    return rdp_epsilon


def _bisect_sigma(epsilon_of, target: float, start: float, tolerance: float = 0.01, max_sigma: float = 1e6) -> float:
    """get_noise_multiplier's search from a starting σ: grow σ until ε <= target, then bisect
    until ε is within ``tolerance`` below the target; returns the σ of the last feasible ε."""
    low, high = 0.0, start
    eps_high = epsilon_of(high)
    while eps_high > target:
        low, high = high, 2 * high
        if high > max_sigma:
            raise ValueError("The privacy budget is too low.")
        eps_high = epsilon_of(high)
    for _ in range(200):
        if target - eps_high <= tolerance:
            break
        mid = (low + high) / 2
        eps = epsilon_of(mid)
        if eps < target:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


__all__ = [
    "AccountantName",
    "SubsampledGaussianAccountant",
    "gaussian_epsilon",
    "calibrate_noise_multiplier",
    "composed_epsilon",
    "GaussianRun",
]
