"""evaluate_ranking on hand-built scorers whose ranks are known."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedml.data.interactions import UserItems
from fedml.evaluation.ranking import evaluate_ranking, popularity_scorer, recall_at_k

N_ITEMS = 20
HISTORIES = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6, 7, 8], 3: [9]}
TARGETS = np.array([10, 11, 12, -1])  # user 3 has nothing held out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(histories: dict[int, list[int]] = HISTORIES, n_items: int = N_ITEMS) -> UserItems:
    users = [u for u, items in histories.items() for _ in items]
    items = [i for items in histories.values() for i in items]
    return UserItems.from_pairs(np.array(users), np.array(items), len(histories), n_items)


def _scorer(fill):
    """A scorer from ``fill(row_scores, history, target)`` writing one user's scores in place."""

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        out = torch.zeros(len(users), N_ITEMS, dtype=torch.float64)
        for row, (user, history) in enumerate(zip(users, histories)):
            fill(out[row], history, int(TARGETS[user]))
        return out

    return score


def _base(row: torch.Tensor) -> None:
    """Distinct scores in [0, 1), item 0 highest: a fixed order for the other items."""
    row[:] = torch.linspace(0.99, 0.0, N_ITEMS, dtype=torch.float64)


def _target_at(rank: int):
    def fill(row, history, target):
        _base(row)
        above = [i for i in range(N_ITEMS) if i != target and i not in history][:rank]
        row[above] = 10.0 + torch.arange(len(above), dtype=torch.float64)
        row[target] = 5.0

    return fill


def test_perfect_scorer():
    metrics = evaluate_ranking(_scorer(_target_at(0)), _train(), TARGETS, k=10)
    assert metrics.users == 3
    assert metrics.hit_rate == 1.0 and metrics.ndcg == 1.0
    assert metrics.hit_rate_sampled == 1.0 and metrics.ndcg_sampled == 1.0
    assert "3 shoppers" in metrics.protocol and "100 sampled negatives" in metrics.protocol
    assert set(metrics.as_metrics("test/")) == {
        "test/hr_at_10", "test/ndcg_at_10", "test/recall_at_10", "test/hr_at_10_sampled", "test/ndcg_at_10_sampled",
        "test/coverage_at_10",
    }  # fmt: skip
    details = metrics.protocol_details
    assert details["k"] == 10 and details["sampled_negatives"] == 100 and details["users"] == 3
    assert details["split"] == "leave-last-out by time" and details["summary"] == metrics.protocol


def test_adversarial_scorer():
    def fill(row, history, target):
        _base(row)
        row[target] = -10.0

    metrics = evaluate_ranking(_scorer(fill), _train(), TARGETS, k=10, sampled_negatives=10)
    # every unseen item (>= 14 of them) is above the target
    assert metrics.hit_rate == 0.0 and metrics.ndcg == 0.0
    assert metrics.hit_rate_sampled == 0.0 and metrics.ndcg_sampled == 0.0


def test_target_at_rank_three():
    metrics = evaluate_ranking(_scorer(_target_at(2)), _train(), TARGETS, k=10)
    assert metrics.hit_rate == 1.0
    assert metrics.ndcg == pytest.approx(1 / math.log2(4))  # 0-based rank 2
    assert evaluate_ranking(_scorer(_target_at(2)), _train(), TARGETS, k=2).hit_rate == 0.0
    assert evaluate_ranking(_scorer(_target_at(2)), _train(), TARGETS, k=3).hit_rate == 1.0


def test_seen_items_are_excluded():
    def fill(row, history, target):
        _base(row)
        row[torch.as_tensor(history)] = 1000.0  # the shopper's own items on top: they do not count
        row[target] = 50.0

    metrics = evaluate_ranking(_scorer(fill), _train(), TARGETS, k=1)
    assert metrics.hit_rate == 1.0 and metrics.ndcg == 1.0
    # and they are not recommended: coverage sees targets only
    assert metrics.coverage == pytest.approx(3 / N_ITEMS)


@pytest.mark.parametrize("n_tied,rank", [(1, 0.5), (3, 1.5), (4, 2.0)])
def test_ties_count_half(n_tied, rank):
    def fill(row, history, target):
        row[:] = 0.0
        row[torch.as_tensor(history)] = 1.0  # seen items tie with the target too: excluded, not ties
        tied = [i for i in range(N_ITEMS) if i != target and i not in history][:n_tied]
        row[tied] = 1.0
        row[target] = 1.0

    metrics = evaluate_ranking(_scorer(fill), _train(), TARGETS, k=10)
    assert metrics.ndcg == pytest.approx(1 / math.log2(rank + 2))
    assert evaluate_ranking(_scorer(fill), _train(), TARGETS, k=1).hit_rate == float(rank < 1)


def test_constant_scorer_ranks_the_target_in_the_middle():
    # a scorer that knows nothing: the target ties with every unseen item (full and sampled)
    constant = _scorer(lambda row, history, target: row.fill_(0.0))
    metrics = evaluate_ranking(constant, _train(), TARGETS, k=10, sampled_negatives=8)
    unseen = np.array([N_ITEMS - len(HISTORIES[u]) - 1 for u in range(3)])  # other unseen items
    assert metrics.ndcg == pytest.approx(np.mean(np.where(unseen / 2 < 10, 1 / np.log2(unseen / 2 + 2), 0.0)))
    assert metrics.ndcg_sampled == pytest.approx(1 / math.log2(8 / 2 + 2))


def test_nan_scores_are_misses():
    nan_target = _scorer(lambda row, history, target: (_base(row), row.__setitem__(target, math.nan)))
    metrics = evaluate_ranking(nan_target, _train(), TARGETS, k=10)
    assert metrics.hit_rate == 0.0 and metrics.hit_rate_sampled == 0.0
    all_nan = _scorer(lambda row, history, target: row.fill_(math.nan))
    metrics = evaluate_ranking(all_nan, _train(), TARGETS, k=5, sampled_negatives=20)
    assert metrics.hit_rate == 0.0 and metrics.hit_rate_sampled == 0.0


def test_sampled_metrics_use_exactly_n_unseen_negatives():
    n_items = 200
    rng = np.random.default_rng(0)
    histories = {u: sorted(rng.choice(np.arange(1, n_items), size=5, replace=False).tolist()) for u in range(30)}
    train = _train(histories, n_items)
    targets = np.zeros(30, dtype=np.int64)  # item 0 held out for everyone, never in a history

    def worst_target(users, hists):
        # the target is below every other item; seen items become -inf, i.e. below the target too
        scores = torch.arange(n_items, 0, -1, dtype=torch.float64).expand(len(users), -1).clone()
        scores[:, 0] = 0.5
        return scores

    n = 50
    hit = evaluate_ranking(worst_target, train, targets, k=n + 1, sampled_negatives=n)
    miss = evaluate_ranking(worst_target, train, targets, k=n, sampled_negatives=n)
    # sampled rank == n for every shopper: n negatives, all above the target, so none was a seen
    # item (those score -inf) and none was the target itself (it would tie)
    assert hit.hit_rate_sampled == 1.0 and hit.ndcg_sampled == pytest.approx(1 / math.log2(n + 2))
    assert miss.hit_rate_sampled == 0.0
    assert hit.hit_rate == 0.0  # full ranking: rank 194
    # asking for more negatives than there are unseen items uses all of them: 200 - 5 - 1 = 194
    everything = evaluate_ranking(worst_target, train, targets, k=195, sampled_negatives=500)
    assert everything.hit_rate_sampled == 1.0 and everything.ndcg_sampled == pytest.approx(1 / math.log2(196))
    assert everything.hit_rate == 1.0 and everything.ndcg == pytest.approx(1 / math.log2(196))
    assert evaluate_ranking(worst_target, train, targets, k=194, sampled_negatives=500).hit_rate_sampled == 0.0


def test_popularity_scorer_ranks_by_training_counts():
    # item 0 in 4 histories, item 1 in 3, item 2 in 2, item 3 in 1
    histories = {0: [0, 1, 2, 3], 1: [0, 1, 2], 2: [0, 1], 3: [0], 4: []}
    train = _train(histories)
    scorer = popularity_scorer(train)
    scores = scorer(np.arange(5), [train.of(u) for u in range(5)])
    assert scores.shape == (5, N_ITEMS)
    expected = np.bincount([i for h in histories.values() for i in h], minlength=N_ITEMS)
    for row in scores:
        np.testing.assert_array_equal(row.numpy(), expected)
    # held out: the most popular unseen item for shoppers 1-3; for shopper 0 an item of
    # popularity 0, tied with the 15 other unseen items of popularity 0 (rank 7.5)
    targets = np.array([7, 3, 2, 1, -1])
    metrics = evaluate_ranking(scorer, train, targets, k=1)
    assert metrics.users == 4
    assert metrics.hit_rate == pytest.approx(3 / 4)
    assert metrics.ndcg == pytest.approx(3 / 4)
    assert evaluate_ranking(scorer, train, targets, k=8).ndcg == pytest.approx((3 + 1 / math.log2(9.5)) / 4)


def test_coverage_counts_distinct_items_in_top_k():
    def same_for_all(row, history, target):
        _base(row)
        row[15:20] = 100.0 + torch.arange(5, dtype=torch.float64)

    assert evaluate_ranking(_scorer(same_for_all), _train(), TARGETS, k=5).coverage == pytest.approx(5 / N_ITEMS)

    def own_target_first(row, history, target):
        same_for_all(row, history, target)
        row[target] = 1000.0

    # top-5 = own target + items 16..19: {10, 11, 12, 16, 17, 18, 19}
    metrics = evaluate_ranking(_scorer(own_target_first), _train(), TARGETS, k=5)
    assert metrics.coverage == pytest.approx(7 / N_ITEMS)


def test_max_users_and_no_users():
    metrics = evaluate_ranking(_scorer(_target_at(0)), _train(), TARGETS, k=10, max_users=2)
    assert metrics.users == 2
    with pytest.raises(ValueError, match="no shopper"):
        evaluate_ranking(_scorer(_target_at(0)), _train(), np.full(4, -1), k=10)


@pytest.mark.parametrize("rank", [0, 4, 9, 10, 15])
def test_recall_equals_hit_rate_with_one_held_out_item(rank):
    metrics = evaluate_ranking(_scorer(_target_at(rank)), _train(), TARGETS, k=10)
    assert metrics.recall == metrics.hit_rate == float(rank < 10)


def test_recall_with_several_held_out_items():
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0], [9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])
    scores[1, 0] = -np.inf  # an excluded (seen) item of row 1
    # row 0: items 1 and 4 held out, ranks 1 and 4; row 1: items 1, 2, 5 at ranks 0, 1, 4
    held_out = [np.array([1, 4]), np.array([1, 2, 5])]
    np.testing.assert_allclose(recall_at_k(scores, held_out, k=2), [0.5, 2 / 3])
    np.testing.assert_allclose(recall_at_k(scores, held_out, k=5), [1.0, 1.0])
    np.testing.assert_allclose(recall_at_k(scores, held_out, k=1), [0.0, 1 / 3])
    tied = np.zeros((1, 6))  # every item ties: each held-out item sits at rank 2.5 of 6
    assert recall_at_k(tied, [np.array([0, 1])], k=3)[0] == 1.0
    assert recall_at_k(tied, [np.array([0, 1])], k=2)[0] == 0.0
    with pytest.raises(ValueError, match="no held-out item"):
        recall_at_k(scores, [np.array([1]), np.array([], dtype=np.int64)], k=2)
