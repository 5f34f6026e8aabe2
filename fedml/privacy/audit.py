"""Empirical privacy audit from one training run with canaries (Steinke, Nasr & Jagielski 2023).

"Privacy Auditing with One (1) Training Run" (NeurIPS 2023), Algorithm 1 and Appendix D. The
auditor makes ``m`` canaries and includes each in the training data independently with probability
1/2 (the inclusion draw is the auditor's secret). After training it scores every canary from the
published model alone, guesses "in" for the ``k_in`` highest scores and "out" for the ``k_out``
lowest, and abstains on the rest. If training is (ε, δ)-DP with respect to adding or removing one
canary, then (Theorem 3.1 with δ, Appendix D) the number ``v`` of correct guesses out of
``r = k_in + k_out`` exceeds what ε-randomized response would get only with small probability:

    P[v correct] <= P[Binomial(r, q) >= v] + 2 m δ · max_i P[v > Binomial(r, q) >= v - i] / i,
    q = e^ε / (1 + e^ε).

The largest ε whose p-value is still at most ``1 - confidence`` is a lower bound on the true ε at
that confidence: an accountant's ε below it means a broken mechanism (or accountant).

Canaries in this recommender (:func:`plant_canaries`): a canary is a synthetic shopper who owns
dedicated catalogue items that nobody else has. The catalogue (item columns) and the user rows of
all ``m`` canaries are always present, so the data's shape does not depend on the secret; an
excluded canary's row is simply empty (an empty shopper contributes nothing: no client update, no
DP-SGD record).

* **User level (DP-FedAvg).** A canary shopper is one user; including it adds that one user. A
  shopper's weight is ``min(n_k / weight_cap, 1)``, so canaries with ``items_per_canary >=
  weight_cap`` carry full weight, as the worst-case user the accountant assumes does (fewer items
  still give a valid, looser bound).
* **Record level (DP-SGD).** With ``items_per_canary=1`` the canary shopper has exactly one
  (shopper, item) pair, i.e. one record, and including it adds that one record. With more items
  per canary a canary is a group of records, and a record-level ε does not bound it.

The auditor also chooses the canary items' *initial* parameters (DP holds for any data-independent
initial model, so this is fair): :func:`canary_initial_table` starts their biases very low
(:data:`CANARY_BIAS`). Then other shoppers' sampled negatives barely move a canary item (the
logistic gradient of a negative is sigmoid(score) ~ e^CANARY_BIAS), while the canary's own positive
pulls it up at full strength (1 - sigmoid(score) ~ 1). The score (:func:`score_canaries`) is how
much a canary's item biases rose. Canary items must be removed from the published model
(:func:`strip_canaries`).

How the guess counts are chosen (:func:`audit`): either fixed in advance (one test; see
:func:`planned_guesses`, which derives them from the run's configuration), or the best of a grid
fixed in advance (:func:`candidate_guesses`), each tested at level ``(1 - confidence) / len(grid)``
(a union bound). Picking the best count after seeing which guesses were right without
such a correction would overstate the confidence.

Limits: even when every guess is right, the bound grows only like log(m), and the ``2 m δ`` term
caps it: at δ = 1e-5 and 95 % confidence, the grid tops out near 4.5 (m ≈ 2000) and a planned
count near 5.0 (m = 1000) or 5.7 (m = 2000). A claimed ε above that cannot be contradicted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from fedml.data.interactions import UserItems
from fedml.models.mf import ItemTable

#: initial bias of canary items (see :func:`canary_initial_table`)
CANARY_BIAS = -6.0
#: fractions of m tried for k_in (and k_out) when the guess counts are not fixed in advance
K_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 5 / 16, 3 / 8, 7 / 16, 15 / 32, 1 / 2)


@dataclass(frozen=True)
class CanarySet:
    """The planted canaries and the auditor's secret: which of them are in the training data.

    Canary ``j`` is the shopper in row ``users[j]`` of the augmented data and owns the item columns
    ``items[j]``; ``included[j]`` says whether its interactions are in the data.
    """

    users: np.ndarray  # int64 [m]
    items: np.ndarray  # int64 [m, items_per_canary]
    included: np.ndarray  # bool [m]
    seed: int
    n_real_users: int
    n_real_items: int

    @property
    def m(self) -> int:
        return int(self.users.shape[0])

    @property
    def items_per_canary(self) -> int:
        return int(self.items.shape[1])


def plant_canaries(data: UserItems, m: int, seed: int, items_per_canary: int = 1) -> tuple[UserItems, CanarySet]:
    """Append ``m`` canary shoppers and their ``items_per_canary`` dedicated items to ``data``.

    Returns the augmented data (``n_users + m`` rows, ``n_items + m * items_per_canary`` items; the
    real shoppers and items keep their indices) and the :class:`CanarySet`. Each canary is included
    independently with probability 1/2, drawn from ``seed``.
    """
    if m < 1:
        raise ValueError(f"m (number of canaries) must be >= 1, got {m}")
    if items_per_canary < 1:
        raise ValueError(f"items_per_canary must be >= 1, got {items_per_canary}")
    included = np.random.default_rng(seed).random(m) < 0.5
    users = data.n_users + np.arange(m, dtype=np.int64)
    items = data.n_items + np.arange(m * items_per_canary, dtype=np.int64).reshape(m, items_per_canary)
    real_users = data.users()
    augmented = UserItems.from_pairs(
        np.concatenate([real_users, np.repeat(users[included], items_per_canary)]),
        np.concatenate([data.items, items[included].ravel()]),
        data.n_users + m,
        data.n_items + m * items_per_canary,
    )
    canaries = CanarySet(users, items, included, int(seed), data.n_users, data.n_items)
    return augmented, canaries


def canary_initial_table(init: ItemTable, canaries: CanarySet, bias: float = CANARY_BIAS) -> ItemTable:
    """``init`` (the canaried catalogue's initial table) with every canary item's bias set to ``bias``.

    Train from this table: with a very low starting bias, sampled negatives hardly move a canary
    item, so a canary's own positive stands out (see the module docstring).
    """
    _check_catalogue(init, canaries, "initial")
    table = init.clone()
    table.bias[torch.as_tensor(canaries.items.ravel(), device=table.bias.device)] = bias
    return table


def score_canaries(initial: ItemTable, trained: ItemTable, canaries: CanarySet) -> np.ndarray:
    """float64 ``[m]``: how much each canary's item biases rose in training (higher: more likely in).

    Needs only the published (trained) table and the initial one, which does not depend on the data.
    """
    _check_catalogue(initial, canaries, "initial")
    _check_catalogue(trained, canaries, "trained")
    rows = torch.as_tensor(canaries.items.ravel())
    rise = trained.bias.detach().cpu().double()[rows] - initial.bias.detach().cpu().double()[rows]
    return rise.numpy().reshape(canaries.m, canaries.items_per_canary).sum(axis=1)


def strip_canaries(table: ItemTable, canaries: CanarySet) -> ItemTable:
    """The item table without the canary items: what may be published and served."""
    _check_catalogue(table, canaries, "trained")
    n = canaries.n_real_items
    return ItemTable(table.embeddings[:n].clone(), table.bias[:n].clone())


def _check_catalogue(table: ItemTable, canaries: CanarySet, name: str) -> None:
    expected = canaries.n_real_items + canaries.m * canaries.items_per_canary
    if table.n_items != expected:
        raise ValueError(f"{name} table has {table.n_items} items, the canaried catalogue has {expected}")


@dataclass(frozen=True)
class AuditResult:
    """An empirical lower bound on ε: with probability >= ``confidence`` the true ε is at least this."""

    epsilon_lower_bound: float
    m: int  # canaries randomized
    guesses: int  # r = k_in + k_out
    correct: int  # v
    confidence: float
    delta: float
    k_in: int
    k_out: int
    candidates: int  # (k_in, k_out) pairs tested; the confidence is split evenly among them
    method: str

    def contradicts(self, epsilon: float) -> bool:
        """Whether a claimed ε is below the empirical lower bound (a likely implementation bug)."""
        return self.epsilon_lower_bound > epsilon

    def describe(self, claimed: float | None = None) -> str:
        """One line for people, e.g. ``epsilon >= 0.000 with 95% confidence (447 of 447 guesses ...)``."""
        line = (
            f"empirical epsilon >= {self.epsilon_lower_bound:.3f} with {self.confidence:.0%} confidence "
            f"({self.correct} of {self.guesses} membership guesses right over {self.m} canaries, delta {self.delta:g})"
        )
        if claimed is None:
            return line
        verdict = "CONTRADICTS the claim" if self.contradicts(claimed) else "consistent with the claim"
        return f"{line}; claimed epsilon {claimed:.3f}: {verdict}"

    def to_tags(self) -> dict[str, str]:
        """Flat ``audit.*`` string tags, like :meth:`PrivacyStatement.to_tags`."""
        return {
            "audit.epsilon_lower_bound": repr(float(self.epsilon_lower_bound)),
            "audit.m": str(self.m),
            "audit.guesses": str(self.guesses),
            "audit.correct": str(self.correct),
            "audit.confidence": repr(float(self.confidence)),
            "audit.delta": repr(float(self.delta)),
            "audit.k_in": str(self.k_in),
            "audit.k_out": str(self.k_out),
            "audit.candidates": str(self.candidates),
            "audit.method": self.method,
        }


def audit(
    scores: np.ndarray,
    canaries: CanarySet,
    delta: float,
    confidence: float = 0.95,
    guesses: tuple[int, int] | None = None,
) -> AuditResult:
    """Guess membership from ``scores`` and turn the correct guesses into a lower bound on ε.

    ``guesses=(k_in, k_out)`` fixes the guess counts in advance: one test at level ``1 -
    confidence``. ``None`` tries every pair of :func:`candidate_guesses` and reports the best
    bound; each pair is then tested at level ``(1 - confidence) / candidates`` (a union bound), so
    picking the best pair after seeing the result stays sound.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (canaries.m,):
        raise ValueError(f"scores must have shape ({canaries.m},), got {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must be in [0, 1), got {delta}")
    pairs = [guesses] if guesses is not None else candidate_guesses(canaries.m)
    for k_in, k_out in pairs:
        if k_in < 0 or k_out < 0 or k_in + k_out > canaries.m or k_in + k_out == 0:
            raise ValueError(f"guesses (k_in={k_in}, k_out={k_out}) must be >= 0, not both 0, sum <= m={canaries.m}")
    level = (1.0 - confidence) / len(pairs)
    # stable sort: ties are broken by canary index, which is public and independent of the secret
    order = np.argsort(-scores, kind="stable")
    in_sorted = canaries.included[order]
    best = None
    for k_in, k_out in pairs:
        correct = int(in_sorted[:k_in].sum() + (~in_sorted[canaries.m - k_out :]).sum())
        eps = epsilon_lower_bound(canaries.m, k_in + k_out, correct, delta, level)
        if best is None or eps > best[0]:
            best = (eps, k_in, k_out, correct)
    eps, k_in, k_out, correct = best
    how = "fixed guesses" if guesses is not None else f"best of {len(pairs)} guess counts, Bonferroni"
    return AuditResult(
        epsilon_lower_bound=eps,
        m=canaries.m,
        guesses=k_in + k_out,
        correct=correct,
        confidence=confidence,
        delta=delta,
        k_in=k_in,
        k_out=k_out,
        candidates=len(pairs),
        method=f"one-run canary audit (Steinke-Nasr-Jagielski 2023), {how}",
    )


def planned_guesses(m: int, participation: float, slack: float = 2.0) -> tuple[int, int]:
    """A guess count to fix in advance: ``(k_in, 0)`` with ``k_in`` the number of included canaries
    expected to have taken part in training, less ``slack`` standard deviations.

    ``participation`` is the chance that an included canary is used at all, known from the run's
    configuration before training: ``1 - (1 - q) ** rounds`` for DP-FedAvg, ``1 - (1 - q) **
    steps`` for DP-SGD. Against a mechanism that leaks, canaries that took part stand out and nearly
    all ``k_in`` guesses are right; one fixed test then needs no union bound, which gives the highest
    bounds this audit can reach (for example ~5.0 with m = 1000 and δ = 1e-5 against ~4.1 from the grid).
    """
    if not 0.0 < participation <= 1.0:
        raise ValueError(f"participation must be in (0, 1], got {participation}")
    mean = m * participation / 2
    k_in = int(mean - slack * math.sqrt(mean * (1 - participation / 2)))
    return max(1, min(k_in, m)), 0


def candidate_guesses(m: int) -> list[tuple[int, int]]:
    """The (k_in, k_out) pairs tried when none is fixed: k_in a fraction of m in
    :data:`K_FRACTIONS`, and k_out either 0 or k_in. Fixed before any data is seen."""
    pairs = []
    for fraction in K_FRACTIONS:
        k = max(1, int(fraction * m))
        for pair in ((k, 0), (k, k)):
            if sum(pair) <= m and pair not in pairs:
                pairs.append(pair)
    return pairs


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if training is (ε, δ)-DP per canary, m canaries randomized.

    Steinke, Nasr & Jagielski 2023, Appendix D (``p_value_DP_audit``), vectorised over i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0.0 <= delta <= 1.0:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[Binomial(r, q) >= v]
    alpha = 0.0
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        # cumulative P[v > Binomial(r, q) >= v - i], divided by i
        alpha = float(np.max(np.cumsum(stats.binom.pmf(v - i, r, q)) / i))
    return min(beta + alpha * delta * 2 * m, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, p: float, tolerance: float = 1e-6) -> float:
    """An ε (within ``tolerance`` of the crossing, rounded down) with ``p_value(m, r, v, ε, δ) <= p``; 0 if
    ``p_value`` at ε = 0 is above ``p``.

    Found by bisection between a rejected ε and one that is not rejected. Rejecting ε also rejects
    every smaller ε (an (ε', δ)-DP mechanism is (ε, δ)-DP for ε >= ε'), so the result is a lower bound
    at confidence ``1 - p`` even where the δ term makes the p-value not strictly monotone in ε.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p (1 - confidence) must be in (0, 1), got {p}")
    if p_value(m, r, v, 0.0, delta) > p:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) <= p:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"p-value stays below {p} at ε = {high} (v={v}, r={r}, m={m})")
    while high - low > tolerance:
        mid = (low + high) / 2
        if p_value(m, r, v, mid, delta) <= p:
            low = mid
        else:
            high = mid
    return low


__all__ = [
    "AuditResult",
    "CanarySet",
    "CANARY_BIAS",
    "audit",
    "canary_initial_table",
    "candidate_guesses",
    "epsilon_lower_bound",
    "p_value",
    "plant_canaries",
    "planned_guesses",
    "score_canaries",
    "strip_canaries",
]
