"""fedml.privacy.audit: the one-run canary audit's maths, and the audit against real training runs.

The training runs use a tiny random shop (400 shoppers, 100 items, 8 positives each) with 256
canaries, the real federated round loop and aggregators, the real accountant, and real DP-SGD.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedml.data.interactions import UserItems
from fedml.federated.aggregation import DPFedAvg, FedAvg
from fedml.federated.client import LocalTraining
from fedml.federated.rounds import train_federated
from fedml.models.mf import ItemTable, init_item_table
from fedml.privacy.accountant import SubsampledGaussianAccountant
from fedml.privacy.audit import (
    CANARY_BIAS,
    CanarySet,
    audit,
    canary_initial_table,
    candidate_guesses,
    epsilon_lower_bound,
    p_value,
    planned_guesses,
    plant_canaries,
    score_canaries,
    strip_canaries,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_USERS, N_ITEMS, PER_USER, DIM = 400, 100, 8, 8
M = 256  # canaries
DELTA = 1e-5
P = 0.05  # 1 - confidence
LOCAL = LocalTraining(epochs=2, lr=0.5, batch_size=8, negatives=4, l2=1e-4)
CLIENT_RATE, ROUNDS, CLIP, WEIGHT_CAP = 0.2, 10, 0.1, 5.0
PARTICIPATION = 1 - (1 - CLIENT_RATE) ** ROUNDS  # chance that an included canary takes part at all


# ---------------------------------------------------------------------------- the maths


def binomial_tail(r: int, q: float, v: int) -> float:
    """P[Binomial(r, q) >= v], summed exactly with math.comb (no scipy)."""
    return math.fsum(math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(v, r + 1))


def paper_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Appendix D's loop, transcribed with math.comb instead of scipy."""
    q = 1 / (1 + math.exp(-eps))
    beta = binomial_tail(r, q, v)
    alpha, total = 0.0, 0.0
    for i in range(1, v + 1):
        total += math.comb(r, v - i) * q ** (v - i) * (1 - q) ** (r - v + i)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize("r", [1, 10, 50, 200])
def test_all_guesses_correct_without_delta_is_the_closed_form(r: int) -> None:
    # delta = 0, v = r: p-value q^r, so the bound solves q^r = P: eps = log(q / (1 - q)), q = P^(1/r)
    # (one guess can never reject at 95 %: q = 0.05 < 1/2 gives no bound)
    q = P ** (1 / r)
    assert epsilon_lower_bound(1000, r, r, 0.0, P) == pytest.approx(max(0.0, math.log(q / (1 - q))), abs=1e-5)


@pytest.mark.parametrize(("r", "v"), [(100, 70), (200, 150), (60, 55)])
def test_bound_without_delta_is_where_the_binomial_test_stops_rejecting(r: int, v: int) -> None:
    # one-sided binomial test: P[Bin(r, q(eps)) >= v] crosses P at the bound
    eps = epsilon_lower_bound(1000, r, v, 0.0, P)
    assert eps > 0
    assert binomial_tail(r, 1 / (1 + math.exp(-eps)), v) <= P
    assert binomial_tail(r, 1 / (1 + math.exp(-(eps + 1e-4))), v) > P


@pytest.mark.parametrize(("m", "r", "v", "eps"), [(256, 100, 90, 1.5), (1000, 300, 250, 0.8), (64, 20, 20, 3.0)])
def test_p_value_with_delta_matches_the_papers_loop(m: int, r: int, v: int, eps: float) -> None:
    expected = paper_p_value(m, r, v, eps, 1e-3)
    assert p_value(m, r, v, eps, 1e-3) == pytest.approx(expected, rel=1e-9)
    assert expected > paper_p_value(m, r, v, eps, 0.0)  # the delta term is visible at this delta


def test_bound_grows_with_correct_guesses_and_with_guesses_at_the_same_accuracy() -> None:
    by_v = [epsilon_lower_bound(256, 100, v, DELTA, P) for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(by_v, by_v[1:])) and by_v[-1] > by_v[0]
    by_r = [epsilon_lower_bound(1000, r, int(0.9 * r), DELTA, P) for r in (20, 50, 100, 200, 400)]
    assert all(a < b for a, b in zip(by_r, by_r[1:]))
    assert epsilon_lower_bound(256, 100, 90, DELTA, P) < epsilon_lower_bound(256, 100, 90, 0.0, P)


@pytest.mark.parametrize(("r", "v"), [(100, 50), (100, 55), (256, 128), (10, 0)])
def test_no_bound_at_chance(r: int, v: int) -> None:
    assert epsilon_lower_bound(256, r, v, DELTA, P) == 0.0


def test_audit_on_random_scores_claims_leakage_at_most_at_the_stated_rate() -> None:
    # scores independent of membership: the true epsilon is 0, so any positive bound is a false
    # claim, which the 95 % confidence allows in at most 5 % of audits. Taking the best of the 12
    # guess counts without the union bound would claim leakage in about 13 % of these 400 audits.
    rng = np.random.default_rng(0)
    claims = sum(
        audit(rng.normal(size=64), synthetic_canaries(64, trial), DELTA).epsilon_lower_bound > 0 for trial in range(400)
    )
    assert claims <= 0.05 * 400


def test_audit_counts_guesses_and_splits_the_confidence_over_the_grid() -> None:
    canaries = synthetic_canaries(M, 1)
    scores = canaries.included.astype(float)  # perfect separation
    fixed = audit(scores, canaries, DELTA, guesses=(64, 64))
    assert (fixed.guesses, fixed.correct, fixed.candidates) == (128, 128, 1)
    assert fixed.epsilon_lower_bound == epsilon_lower_bound(M, 128, 128, DELTA, P)
    best = audit(scores, canaries, DELTA)
    assert best.candidates == len(candidate_guesses(M)) > 1
    assert (best.k_in, best.k_out) in candidate_guesses(M)
    assert best.epsilon_lower_bound == epsilon_lower_bound(M, best.guesses, best.correct, DELTA, P / best.candidates)
    # choosing the count after the fact has a price: the same guesses would give more at full level
    assert best.epsilon_lower_bound < epsilon_lower_bound(M, best.guesses, best.correct, DELTA, P)
    # the worst scoring: every guess wrong
    assert audit(-scores, canaries, DELTA).epsilon_lower_bound == 0.0


def test_planned_guesses_leave_room_below_the_expected_number_of_used_canaries() -> None:
    # all included canaries used: Binomial(400, 1/2) has mean 200 and sd 10, two sd below is 180
    assert planned_guesses(400, 1.0) == (180, 0)
    k_in, _ = planned_guesses(1000, 0.5)  # mean 250, sd sqrt(250 * 0.75)
    assert k_in == int(250 - 2 * math.sqrt(187.5))
    with pytest.raises(ValueError, match="participation"):
        planned_guesses(100, 0.0)


def test_audit_result_tags() -> None:
    canaries = synthetic_canaries(M, 2)
    result = audit(canaries.included.astype(float), canaries, DELTA, confidence=0.9, guesses=(32, 0))
    tags = result.to_tags()
    assert all(k.startswith("audit.") and isinstance(v, str) for k, v in tags.items())
    assert float(tags["audit.epsilon_lower_bound"]) == result.epsilon_lower_bound
    assert tags["audit.m"] == str(M) and tags["audit.guesses"] == "32" and tags["audit.correct"] == "32"
    assert float(tags["audit.confidence"]) == 0.9 and float(tags["audit.delta"]) == DELTA
    assert "Steinke" in tags["audit.method"]
    assert result.contradicts(result.epsilon_lower_bound - 0.1) and not result.contradicts(result.epsilon_lower_bound)


def test_audit_refuses_bad_arguments() -> None:
    canaries = synthetic_canaries(8, 0)
    with pytest.raises(ValueError, match="shape"):
        audit(np.zeros(7), canaries, DELTA)
    with pytest.raises(ValueError, match="guesses"):
        audit(np.zeros(8), canaries, DELTA, guesses=(5, 4))
    with pytest.raises(ValueError, match="confidence"):
        audit(np.zeros(8), canaries, DELTA, confidence=1.0)


# ---------------------------------------------------------------------------- planting


def synthetic_canaries(m: int, seed: int) -> CanarySet:
    return plant_canaries(UserItems.from_pairs(np.zeros(1), np.zeros(1), 1, 1), m, seed)[1]


@pytest.fixture(scope="module")
def shop() -> UserItems:
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(N_USERS), PER_USER)
    items = np.concatenate([rng.choice(N_ITEMS, PER_USER, replace=False) for _ in range(N_USERS)])
    return UserItems.from_pairs(users, items, N_USERS, N_ITEMS)


def test_plant_canaries_appends_canary_shoppers_with_their_own_items(shop: UserItems) -> None:
    data, canaries = plant_canaries(shop, M, seed=3, items_per_canary=2)
    assert (data.n_users, data.n_items) == (N_USERS + M, N_ITEMS + 2 * M)
    for user in range(N_USERS):  # real shoppers untouched
        np.testing.assert_array_equal(data.of(user), shop.of(user))
    for j in range(M):
        expected = canaries.items[j] if canaries.included[j] else []
        np.testing.assert_array_equal(data.of(int(canaries.users[j])), expected)
    assert set(canaries.items.ravel()) == set(range(N_ITEMS, N_ITEMS + 2 * M))  # nobody else has them
    assert 0.4 < canaries.included.mean() < 0.6
    again = plant_canaries(shop, M, seed=3, items_per_canary=2)[1]
    np.testing.assert_array_equal(again.included, canaries.included)
    assert not np.array_equal(plant_canaries(shop, M, seed=4)[1].included, canaries.included)


def test_initial_table_score_and_strip(shop: UserItems) -> None:
    data, canaries = plant_canaries(shop, M, seed=0)
    init = init_item_table(data.n_items, DIM, 0.1, 0)
    start = canary_initial_table(init, canaries)
    assert torch.equal(start.embeddings, init.embeddings) and torch.equal(start.bias[:N_ITEMS], init.bias[:N_ITEMS])
    assert torch.all(start.bias[N_ITEMS:] == CANARY_BIAS)
    moved = start.clone()
    moved.bias[int(canaries.items[5, 0])] += 0.25
    np.testing.assert_allclose(score_canaries(start, moved, canaries), np.eye(M)[5] * 0.25)
    published = strip_canaries(moved, canaries)
    assert published.n_items == N_ITEMS and torch.equal(published.bias, moved.bias[:N_ITEMS])
    with pytest.raises(ValueError, match="canaried catalogue"):
        strip_canaries(published, canaries)


# ---------------------------------------------------------------------------- real training runs


def train_with_canaries(shop: UserItems, aggregator_for) -> tuple[ItemTable, ItemTable, CanarySet]:
    """Federated training of the canaried shop; ``aggregator_for(data)`` builds the aggregator."""
    data, canaries = plant_canaries(shop, M, seed=0, items_per_canary=int(WEIGHT_CAP))  # full client weight
    init = canary_initial_table(init_item_table(data.n_items, DIM, 0.1, 0), canaries)
    run = train_federated(
        data, init, LOCAL, aggregator_for(data), rounds=ROUNDS, client_rate=CLIENT_RATE, server_lr=50.0, seed=0
    )
    return init, run.table, canaries


def dp_fedavg(noise_multiplier: float):
    def build(data: UserItems) -> DPFedAvg:
        return DPFedAvg.for_population(
            data.counts(), CLIENT_RATE, clip_norm=CLIP, noise_multiplier=noise_multiplier, weight_cap=WEIGHT_CAP,
            generator=torch.Generator().manual_seed(1),
        )  # fmt: skip

    return build


def claimed_epsilon(noise_multiplier: float) -> float:
    accountant = SubsampledGaussianAccountant(noise_multiplier, CLIENT_RATE, "rdp")
    accountant.step(ROUNDS)
    return accountant.epsilon(DELTA)


def test_without_dp_the_audit_finds_a_high_epsilon(shop: UserItems) -> None:
    init, trained, canaries = train_with_canaries(shop, lambda data: FedAvg())
    result = audit(score_canaries(init, trained, canaries), canaries, DELTA)
    # 256 canaries, 12 guess counts: > 2 needs e.g. 50+ guesses all correct (at 0.05 / 12 each);
    # a canary that took part at least once (89 % of them in 10 rounds at q = 0.2) stands out
    assert result.epsilon_lower_bound > 2.0, result
    assert result.correct >= 0.95 * result.guesses


def test_with_dp_fedavg_the_bound_stays_below_the_claimed_epsilon(shop: UserItems) -> None:
    init, trained, canaries = train_with_canaries(shop, dp_fedavg(3.0))
    claimed = claimed_epsilon(3.0)
    scores = score_canaries(init, trained, canaries)
    assert 0.5 < claimed < 2.0  # small enough that a broken mechanism exceeds it (next test)
    for guesses in (None, planned_guesses(M, PARTICIPATION)):
        result = audit(scores, canaries, DELTA, guesses=guesses)
        assert result.epsilon_lower_bound <= claimed, (result, claimed)


def test_a_mechanism_without_noise_claiming_sigma_3_is_caught(shop: UserItems) -> None:
    init, trained, canaries = train_with_canaries(shop, dp_fedavg(0.0))  # clipped, but no noise
    claimed = claimed_epsilon(3.0)  # what the run would state
    scores = score_canaries(init, trained, canaries)
    for guesses in (None, planned_guesses(M, PARTICIPATION)):
        result = audit(scores, canaries, DELTA, guesses=guesses)
        assert result.contradicts(claimed), (result, claimed)
        assert result.epsilon_lower_bound > claimed + 1.0


@pytest.mark.parametrize("private", [False, True])
def test_record_level_audit_of_central_training(shop: UserItems, private: bool) -> None:
    from fedml.privacy.dpsgd import train_central

    data, canaries = plant_canaries(shop, M, seed=0)  # one record per canary
    init = canary_initial_table(init_item_table(data.n_items, DIM, 0.1, 0), canaries)
    trained = train_central(
        data, init, epochs=2, batch_size=64, lr=0.05, negatives=4, l2=1e-4, seed=0, private=private,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA,
    )  # fmt: skip
    result = audit(score_canaries(init, trained.table, canaries), canaries, DELTA)
    if private:
        assert trained.statement is not None and trained.statement.unit == "record"
        assert result.epsilon_lower_bound <= trained.statement.epsilon, (result, trained.statement)
    else:
        assert result.epsilon_lower_bound > 2.0, result  # every included record was trained on twice
