"""The lifetime privacy budget of a cohort of shoppers, across every run that touched its data.

Scheduled retraining reuses the same shoppers' data, so the privacy each run spends adds up. A
ledger keeps one :class:`LedgerEntry` per run and data cohort; :func:`lifetime` composes what
the entries charge with the accountant (summed RDP curves or composed privacy-loss
distributions: far tighter than adding ε's), and :func:`check_budget` tells, *before* a run
spends anything, whether it fits the cohort's lifetime budget.

What an entry charges:

* ``open``: the run is reserved or still running, or it was killed without closing its entry. It
  is charged everything it planned (it may still spend it all).
* ``finished`` / ``failed``: what it actually spent (``steps_charged``): a finished run its
  steps, a failed one the steps it completed plus the one in flight. Whether the model was
  promoted does not matter: the noise was released to the devices either way.
* ``refused``: nothing (the check refused it before training).

A cohort is budgeted in one unit: a record-level run cannot spend a user-level budget (a record
guarantee says nothing about a whole shopper), so mixing units on one cohort is an error.

Storage is not this module's job: the flows keep entries in the tracking server's store
(:mod:`flows.ledger`), so they are as durable as the runs they account for.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from fedml.privacy.accountant import AccountantName, composed_epsilon

EntryStatus = Literal["open", "finished", "failed", "refused"]
STATUSES: tuple[str, ...] = ("open", "finished", "failed", "refused")


class LedgerError(ValueError):
    """The ledger cannot account for this run (e.g. a unit that does not match the cohort's)."""


class BudgetExceeded(RuntimeError):
    """A run would take a cohort past its lifetime budget; the message says what is left."""


@dataclass(frozen=True)
class Charge:
    """What one run's privacy mechanism spends: a Poisson-subsampled Gaussian (σ, q) over
    ``steps`` rounds or steps, or a pure ε-DP mechanism (``pure_epsilon``)."""

    mechanism: str
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int = 0
    pure_epsilon: float | None = None

    def __post_init__(self) -> None:
        gaussian = self.noise_multiplier is not None and self.sample_rate is not None
        if gaussian == (self.pure_epsilon is not None):
            raise LedgerError("a charge is either Gaussian (noise_multiplier and sample_rate) or pure (pure_epsilon)")
        if self.steps < 0:
            raise LedgerError(f"steps must be >= 0, got {self.steps}")

    @property
    def is_gaussian(self) -> bool:
        return self.pure_epsilon is None

    def with_steps(self, steps: int) -> Charge:
        return replace(self, steps=int(steps)) if self.is_gaussian else self


@dataclass(frozen=True)
class LedgerEntry:
    """One run's spending on one cohort."""

    entry_id: str
    cohort: str
    unit: Literal["user", "record"]
    planned: Charge
    status: EntryStatus
    run_id: str = ""  # the training run that spends it
    started: str = ""  # ISO time the entry was opened
    steps_done: int = 0  # rounds/steps the run reported as completed
    steps_charged: int | None = None  # set when the entry is closed
    note: str = ""

    @property
    def charged(self) -> Charge | None:
        """What this entry counts for in the cohort's lifetime spend (None: nothing)."""
        if self.status == "refused":
            return None
        if self.status == "open" or self.steps_charged is None:
            return self.planned
        return self.planned.with_steps(min(self.steps_charged, self.planned.steps))


@dataclass(frozen=True)
class Lifetime:
    """A cohort's composed spend: ε at ``delta`` per accountant and the bound that counts."""

    cohort: str
    unit: str | None
    delta: float
    runs: int
    by_accountant: dict[str, float]
    accountant: str  # which entry of by_accountant is ``epsilon``

    @property
    def epsilon(self) -> float:
        return self.by_accountant[self.accountant]


@dataclass(frozen=True)
class BudgetCheck:
    """The answer to "may this run start?"."""

    allowed: bool
    cohort: str
    budget: float
    spent: Lifetime  # before this run
    with_run: Lifetime  # if this run spends all it plans
    run_alone: float  # this run's own ε

    def message(self) -> str:
        head = (
            f"cohort {self.cohort!r} has spent epsilon {self.spent.epsilon:.3f} "
            f"({self.spent.unit or 'no'}-level, delta {self.spent.delta:g}, {self.spent.accountant}) over "
            f"{self.spent.runs} run(s) of its lifetime budget {self.budget:g}; this run would spend "
            f"{self.run_alone:.3f} on its own"
        )
        if self.allowed:
            return f"{head}, {self.with_run.epsilon:.3f} in all: within budget"
        return (
            f"{head} and bring the lifetime total to {self.with_run.epsilon:.3f} > {self.budget:g}: refused "
            f"before training. {_headroom(self.budget, self.spent.epsilon)} Use fewer rounds, more noise, "
            "a new cohort of shoppers, or a budget decision recorded in the promotion policy."
        )


def lifetime(
    entries: Iterable[LedgerEntry],
    cohort: str,
    delta: float,
    accountant: AccountantName = "rdp",
    extra: Sequence[Charge] = (),
    every_accountant: bool = True,
) -> Lifetime:
    """Compose the charges of ``cohort``'s entries (plus ``extra`` planned charges) at ``delta``.

    Reports the RDP bound, the PRV bound when every charge is Gaussian, and basic composition
    when every charge is pure; ``epsilon`` is the configured accountant's (each is a valid upper
    bound; basic composition is used instead when it is smaller, as it is for a few pure charges).
    ``every_accountant=False`` computes only the configured accountant's (and basic composition).
    """
    mine = [e for e in entries if e.cohort == cohort and e.charged is not None]
    units = {e.unit for e in mine}
    if len(units) > 1:
        raise LedgerError(f"cohort {cohort!r} has entries in several units: {sorted(units)}")
    charges = [c for e in mine if (c := e.charged) is not None] + list(extra)
    gaussian = [(c.noise_multiplier, c.sample_rate, c.steps) for c in charges if c.is_gaussian]
    pure = [c.pure_epsilon for c in charges if not c.is_gaussian]
    by = {}
    if every_accountant or accountant == "rdp" or pure:
        by["rdp"] = composed_epsilon(gaussian, delta, "rdp", pure)  # type: ignore[arg-type]
    if not pure and (every_accountant or accountant == "prv"):
        by["prv"] = composed_epsilon(gaussian, delta, "prv")  # type: ignore[arg-type]
    if not gaussian:
        by["basic"] = float(sum(pure))  # type: ignore[arg-type]
    chosen = accountant if accountant in by else "rdp"
    if "basic" in by and by["basic"] < by[chosen]:
        chosen = "basic"
    return Lifetime(cohort, next(iter(units), None), delta, len(mine), by, chosen)


def check_budget(
    entries: Iterable[LedgerEntry],
    cohort: str,
    unit: str,
    planned: Charge,
    budget: float,
    delta: float,
    accountant: AccountantName = "rdp",
    exclude: str | None = None,
) -> BudgetCheck:
    """May a run that plans ``planned`` on ``cohort`` start without passing ``budget``?

    ``exclude`` is the run's own (already opened) entry, which is counted as ``planned`` instead.
    Open entries of other runs count in full: they may be running now.
    """
    if not budget > 0:
        raise LedgerError(f"the lifetime budget must be > 0, got {budget}")
    others = [e for e in entries if e.entry_id != exclude]
    cohort_units = {e.unit for e in others if e.cohort == cohort and e.charged is not None}
    if cohort_units and unit not in cohort_units:
        raise LedgerError(
            f"cohort {cohort!r} is budgeted per {cohort_units.pop()}; a {unit}-level run cannot spend it "
            "(its guarantee does not bound the same thing): use another cohort name"
        )
    spent = lifetime(others, cohort, delta, accountant, every_accountant=False)
    with_run = lifetime(others, cohort, delta, accountant, extra=[planned], every_accountant=False)
    alone = charge_epsilon(planned, delta, accountant)
    allowed = with_run.epsilon <= budget
    return BudgetCheck(allowed, cohort, float(budget), spent, with_run, alone)


def charge_epsilon(charge: Charge, delta: float, accountant: AccountantName = "rdp") -> float:
    """ε of one charge on its own."""
    if not charge.is_gaussian:
        return float(charge.pure_epsilon)  # type: ignore[arg-type]
    return composed_epsilon([(charge.noise_multiplier, charge.sample_rate, charge.steps)], delta, accountant)  # type: ignore[list-item]


def _headroom(budget: float, spent: float) -> str:
    if spent >= budget:
        return "Nothing is left."
    return f"At most epsilon {budget - spent:.3f} is left (less in practice: epsilons do not add linearly)."


def describe_entries(entries: Sequence[LedgerEntry], delta: float, accountant: AccountantName = "rdp") -> str:
    """A plain-text table of the entries and each cohort's lifetime spend (for the ops command)."""
    if not entries:
        return "the privacy ledger is empty"
    lines = [f"{'cohort':<28} {'unit':<6} {'status':<9} {'steps':>11} {'eps(run)':>9}  {'started':<20} run"]
    for e in sorted(entries, key=lambda x: (x.cohort, x.started)):
        charged = e.charged
        run_eps = charge_epsilon(charged, delta, accountant) if charged else 0.0
        steps = f"{e.steps_done}/{e.planned.steps}" if e.planned.is_gaussian else "pure"
        lines.append(
            f"{e.cohort[:28]:<28} {e.unit:<6} {e.status:<9} {steps:>11} {_fmt(run_eps):>9}  {e.started[:19]:<20} "
            f"{e.run_id}{'  (' + e.note + ')' if e.note else ''}"
        )
    lines.append("")
    for cohort in sorted({e.cohort for e in entries}):
        total = lifetime(entries, cohort, delta, accountant)
        parts = ", ".join(f"{k} {_fmt(v)}" for k, v in total.by_accountant.items())
        lines.append(
            f"cohort {cohort!r}: lifetime epsilon {_fmt(total.epsilon)} ({total.unit}-level, delta {delta:g}; "
            f"{parts}) over {total.runs} charged run(s)"
        )
    if any(e.status == "open" for e in entries):
        lines.append("open entries (running, or killed before closing) are charged all they planned")
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.3f}"


__all__ = [
    "BudgetCheck",
    "BudgetExceeded",
    "Charge",
    "LedgerEntry",
    "LedgerError",
    "Lifetime",
    "STATUSES",
    "charge_epsilon",
    "check_budget",
    "describe_entries",
    "lifetime",
]
