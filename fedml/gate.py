"""The promotion gate: may a newly trained version replace production?

A policy file (TOML) sets the ceilings and floors; :func:`decide` compares a candidate with the
policy and with the current production version and returns every reason it fails, not just the
first. It is pure: reading and writing the registry is the flow's job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from fedml.config import read_toml


class PolicyError(ValueError):
    """The policy file is missing or invalid; the message names the file and key."""


@dataclass(frozen=True)
class Policy:
    max_epsilon: float = 8.0  # headline epsilon ceiling (a model without DP has epsilon = inf)
    max_delta: float = 1e-5
    max_lifetime_epsilon: float = math.inf  # the cohort's composed spend over all runs (the ledger's)
    require_audit: bool = False  # a version without an empirical privacy audit fails
    min_hr_at_10: float = 0.0
    max_regression: float = 0.02  # allowed absolute HR@10 drop against the production version
    require_validation_passed: bool = True


@dataclass(frozen=True)
class Candidate:
    """The facts about a model version the gate needs."""

    epsilon: float
    delta: float
    hr_at_10: float
    validation_passed: bool
    lifetime_epsilon: float | None = None  # the cohort's lifetime spend including this run
    audit_lower_bound: float | None = None  # empirical ε lower bound of the run's privacy audit


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)  # why not, one line each; empty when promoted

    def summary(self) -> str:
        return "promoted" if self.promote else "not promoted: " + "; ".join(self.reasons)


_KEYS = {
    ("privacy", "max_epsilon"): float,
    ("privacy", "max_delta"): float,
    ("privacy", "max_lifetime_epsilon"): float,
    ("privacy", "require_audit"): bool,
    ("quality", "min_hr_at_10"): float,
    ("quality", "max_regression"): float,
    ("validation", "require_passed"): bool,
}


def load_policy(path: str | Path) -> Policy:
    """Read a policy file with sections [privacy], [quality] and [validation]."""
    data = read_toml(path, "promotion policy file", PolicyError)
    values = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise PolicyError(f"{path}: [{section}] must be a table")
        for key, value in table.items():
            kind = _KEYS.get((section, key))
            if kind is None:
                raise PolicyError(f"{path}: unknown policy key {section}.{key}")
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind):
                raise PolicyError(f"{path}: {section}.{key} must be {kind.__name__}, got {value!r}")
            values["require_validation_passed" if key == "require_passed" else key] = value
    return Policy(**values)


def decide(candidate: Candidate, policy: Policy, production: Candidate | None) -> GateDecision:
    """Every policy rule the candidate breaks; it is promoted when there are none."""
    reasons = []
    if not math.isfinite(candidate.epsilon):
        reasons.append("no differential privacy guarantee (epsilon = inf)")
    elif candidate.epsilon > policy.max_epsilon:
        reasons.append(f"epsilon {candidate.epsilon:.3f} exceeds the ceiling {policy.max_epsilon:g}")
    if not candidate.delta <= policy.max_delta:  # written so that NaN fails
        reasons.append(f"delta {candidate.delta:g} exceeds the ceiling {policy.max_delta:g}")
    if candidate.lifetime_epsilon is not None and not candidate.lifetime_epsilon <= policy.max_lifetime_epsilon:
        reasons.append(
            f"the cohort's lifetime epsilon {candidate.lifetime_epsilon:.3f} exceeds its budget "
            f"{policy.max_lifetime_epsilon:g}"
        )
    if candidate.audit_lower_bound is None:
        if policy.require_audit:
            reasons.append("no empirical privacy audit was run")
    elif candidate.audit_lower_bound > candidate.epsilon:
        reasons.append(
            f"the privacy audit's empirical lower bound {candidate.audit_lower_bound:.3f} exceeds the claimed "
            f"epsilon {candidate.epsilon:.3f}: the mechanism does not deliver its claim (likely an implementation bug)"
        )
    if not candidate.hr_at_10 >= policy.min_hr_at_10:
        reasons.append(f"HR@10 {candidate.hr_at_10:.4f} is below the floor {policy.min_hr_at_10:g}")
    if production is not None and candidate.hr_at_10 < production.hr_at_10 - policy.max_regression:
        reasons.append(
            f"HR@10 {candidate.hr_at_10:.4f} regresses more than {policy.max_regression:g} "
            f"against production ({production.hr_at_10:.4f})"
        )
    if policy.require_validation_passed and not candidate.validation_passed:
        reasons.append("data validation did not pass")
    return GateDecision(promote=not reasons, reasons=reasons)
