"""What a trained model's privacy guarantee is, in one value that can be logged and read.

A :class:`PrivacyStatement` names the guarantee (ε, δ), the *unit* it protects (one shopper's
whole data, or one record), the mechanism, the accountant that computed ε, and the sampling the
accounting relies on. ``to_tags`` gives the flat ``privacy.*`` form logged with a run;
``describe`` gives one human-readable line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

_ACCOUNTANT_NAMES = {
    "rdp (opacus)": "RDP accountant (Opacus)",
    "prv (opacus)": "PRV accountant (Opacus)",
}


@dataclass(frozen=True)
class PrivacyStatement:
    """An (ε, δ)-DP guarantee and what it is about."""

    epsilon: float
    delta: float
    unit: Literal["user", "record"]  # what one protected "neighbouring" change is
    mechanism: str  # e.g. "dp-fedavg (gaussian, clipped client updates)", "dp-sgd (opacus)"
    accountant: str  # "rdp (opacus)", "prv (opacus)", "pure-epsilon composition"
    sampling: str  # "poisson q=0.2", "none"
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    def __post_init__(self) -> None:
        if self.unit not in ("user", "record"):
            raise ValueError(f"unit must be 'user' or 'record', got {self.unit!r}")
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise ValueError(f"epsilon must be >= 0 (inf allowed), got {self.epsilon!r}")
        if not 0.0 <= self.delta < 1.0:
            raise ValueError(f"delta must be in [0, 1), got {self.delta!r}")

    def to_tags(self) -> dict[str, str]:
        """Flat ``privacy.*`` string tags (optional fields only when set)."""
        tags = {
            "privacy.epsilon": repr(float(self.epsilon)),
            "privacy.delta": repr(float(self.delta)),
            "privacy.unit": self.unit,
            "privacy.mechanism": self.mechanism,
            "privacy.accountant": self.accountant,
            "privacy.sampling": self.sampling,
        }
        if self.noise_multiplier is not None:
            tags["privacy.noise_multiplier"] = repr(float(self.noise_multiplier))
        if self.sample_rate is not None:
            tags["privacy.sample_rate"] = repr(float(self.sample_rate))
        if self.steps is not None:
            tags["privacy.steps"] = str(int(self.steps))
        return tags

    def describe(self) -> str:
        """One line, e.g. ``ε = 3.21 (δ = 1e-05) per user, dp-fedavg ..., RDP accountant (Opacus),
        Poisson sampling q = 0.2, σ = 0.8, 30 rounds``."""
        parts = [
            f"ε = {self.epsilon:.3g} (δ = {self.delta:g}) per {self.unit}",
            self.mechanism,
            _ACCOUNTANT_NAMES.get(self.accountant, self.accountant),
            _describe_sampling(self.sampling),
        ]
        if self.noise_multiplier is not None:
            parts.append(f"σ = {self.noise_multiplier:.4g}")
        if self.steps is not None:
            word = "rounds" if "fedavg" in self.mechanism else "steps"
            parts.append(f"{self.steps} {word}")
        return ", ".join(parts)


def _describe_sampling(sampling: str) -> str:
    if sampling == "none":
        return "no sampling"
    kind, _, rest = sampling.partition(" ")
    if kind == "poisson":
        return "Poisson sampling " + rest.replace("=", " = ")
    return sampling


def compose_pure(statements: Iterable[PrivacyStatement]) -> PrivacyStatement:
    """Basic composition of pure-ε mechanisms applied to the same record: ε adds up, δ = 0.

    All statements must be pure (δ = 0) and about the same unit.
    """
    statements = list(statements)
    if not statements:
        raise ValueError("compose_pure needs at least one statement")
    units = {s.unit for s in statements}
    if len(units) != 1:
        raise ValueError(f"cannot compose statements about different units: {sorted(units)}")
    impure = [s.mechanism for s in statements if s.delta != 0.0]
    if impure:
        raise ValueError(f"compose_pure composes pure-ε mechanisms only; δ > 0 for {impure}")
    return PrivacyStatement(
        epsilon=float(sum(s.epsilon for s in statements)),
        delta=0.0,
        unit=statements[0].unit,
        mechanism=" + ".join(s.mechanism for s in statements),
        accountant="pure-epsilon composition",
        sampling="none",
    )


__all__ = ["PrivacyStatement", "compose_pure"]
