"""The one evaluation protocol: leave-last-out by time, ranking metrics, popularity baseline.

Protocol (written next to every figure as :data:`PROTOCOL`): each shopper's last interaction by
time is held out; the model ranks items for the shopper from the rest of their history;
items already in that history are excluded. *Full ranking* ranks the held-out item against the
whole catalogue; *sampled* ranks it against 100 items drawn uniformly from those the shopper never
interacted with (as many papers do, for comparison only: sampled metrics overstate quality).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fedml.data.interactions import UserItems

PROTOCOL = (
    "leave-last-out by time; seen items excluded; full ranking over the catalogue "
    "(and against {neg} sampled negatives); {users} shoppers with a held-out item"
)

#: scores(user indices, their histories) -> [len(users), n_items] scores
Scorer = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


@dataclass
class RankingMetrics:
    k: int
    users: int
    hit_rate: float  # HR@K, full ranking
    ndcg: float  # NDCG@K, full ranking
    hit_rate_sampled: float  # HR@K against sampled negatives
    ndcg_sampled: float
    coverage: float  # share of the catalogue in anyone's top-K
    protocol: str

    def as_metrics(self, prefix: str) -> dict[str, float]:
        k = self.k
        return {
            f"{prefix}hr_at_{k}": self.hit_rate,
            f"{prefix}ndcg_at_{k}": self.ndcg,
            f"{prefix}hr_at_{k}_sampled": self.hit_rate_sampled,
            f"{prefix}ndcg_at_{k}_sampled": self.ndcg_sampled,
            f"{prefix}coverage_at_{k}": self.coverage,
        }


def evaluate_ranking(
    scorer: Scorer,
    train: UserItems,
    test_items: np.ndarray,
    *,
    k: int = 10,
    sampled_negatives: int = 100,
    max_users: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
) -> RankingMetrics:
    """HR@K and NDCG@K (full and sampled) and coverage for every shopper with a held-out item."""
    rng = np.random.default_rng(seed)
    users = np.flatnonzero(test_items >= 0)
    if max_users is not None and len(users) > max_users:
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    full_ranks, sampled_ranks, recommended = [], [], []
    for start in range(0, len(users), batch_size):
        batch = users[start : start + batch_size]
        histories = [train.of(int(u)) for u in batch]
        scores = scorer(batch, histories).detach().double().cpu().numpy().copy()  # writable, own memory
        scores[np.isnan(scores)] = -np.inf  # a NaN score ranks last, never above or tied with the target
        targets = test_items[batch]
        for row, history in enumerate(histories):
            scores[row, history] = -np.inf
        target_scores = scores[np.arange(len(batch)), targets]
        full_ranks.append(_rank(scores, target_scores))
        sampled_ranks.append(_sampled_ranks(scores, target_scores, histories, targets, sampled_negatives, rng))
        recommended.append(np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k])
    if not len(users):
        raise ValueError("no shopper has a held-out item to evaluate on")
    full = np.concatenate(full_ranks)
    sampled = np.concatenate(sampled_ranks)
    return RankingMetrics(
        k=k,
        users=int(len(users)),
        hit_rate=float(np.mean(full < k)),
        ndcg=_ndcg(full, k),
        hit_rate_sampled=float(np.mean(sampled < k)),
        ndcg_sampled=_ndcg(sampled, k),
        coverage=float(len(np.unique(np.concatenate(recommended))) / train.n_items),
        protocol=PROTOCOL.format(neg=sampled_negatives, users=len(users)),
    )


def popularity_scorer(train: UserItems) -> Scorer:
    """The baseline: every shopper gets the most popular items they have not seen."""
    popularity = torch.as_tensor(train.item_popularity(), dtype=torch.float64)

    def score(users: np.ndarray, histories: list[np.ndarray]) -> torch.Tensor:
        return popularity.expand(len(users), -1)

    return score


def _ndcg(ranks: np.ndarray, k: int) -> float:
    gains = np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean())


def _sampled_ranks(
    scores: np.ndarray,
    target_scores: np.ndarray,
    histories: list[np.ndarray],
    targets: np.ndarray,
    n: int,
    rng: np.random.Generator,
) -> np.ndarray:
    n_items = scores.shape[1]
    ranks = np.empty(len(histories), dtype=np.float64)
    for row, history in enumerate(histories):
        excluded = np.union1d(history, [targets[row]])
        candidates = np.setdiff1d(np.arange(n_items), excluded, assume_unique=True)
        picked = rng.choice(candidates, size=min(n, len(candidates)), replace=False)
        candidates_and_target = np.append(scores[row, picked], target_scores[row])
        ranks[row] = _rank(candidates_and_target[None, :], target_scores[row : row + 1])[0]
    return ranks


def _rank(scores: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each target; ties with other items count half (neither optimistic nor pessimistic)."""
    above = (scores > target_scores[:, None]).sum(1)
    ties = (scores == target_scores[:, None]).sum(1) - 1  # the target ties with itself
    return above + np.maximum(ties, 0) / 2.0
