"""The one evaluation protocol: leave-last-out by time, ranking metrics, popularity baseline.

The pipeline (``flows.pipeline``) and the quality benchmark (``bench.quality``) both call
:func:`evaluate_ranking`, so every figure follows one protocol, written next to it
(:class:`Protocol`: a sentence and a dict): each shopper's last interaction by time is held out; the
model ranks items for the shopper from the rest of their history; items already in that history
are excluded. *Full ranking* ranks the held-out item against the whole catalogue; *sampled* ranks it
against 100 items drawn uniformly from those the shopper never interacted with (as many papers do,
for comparison only: sampled metrics overstate quality). Ties with the target count half.

Metrics: HR@K (the held-out item is in the top K), NDCG@K, recall@K (the share of a shopper's
held-out items in the top K, :func:`recall_at_k`; with one held-out item per shopper, as here, it
equals HR@K) and catalogue coverage (the share of items in anyone's top K).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedml.data.interactions import UserItems

PROTOCOL = (
    "leave-last-out by time; seen items excluded; full ranking over the catalogue "
    "(and against {neg} sampled negatives); {users} shoppers with a held-out item"
)

SPLIT = "leave-last-out by time"
RANKING = "full ranking over the catalogue, items in the shopper's training history excluded"
TIES = "a tie with the held-out item counts half"


@dataclass(frozen=True)
class Protocol:
    """How a figure was measured; :meth:`describe` is the sentence, :meth:`as_dict` the facts."""

    k: int
    sampled_negatives: int
    users: int
    split: str = SPLIT
    ranking: str = RANKING
    ties: str = TIES
    recall: str = "recall@K: share of the shopper's held-out items in the top K (one held-out item: = HR@K)"

    def describe(self) -> str:
        return PROTOCOL.format(neg=self.sampled_negatives, users=self.users)

    def as_dict(self) -> dict[str, str | int]:
        return {**asdict(self), "summary": self.describe()}


#: scores(user indices, their histories) -> [len(users), n_items] scores
Scorer = Callable[[np.ndarray, list[np.ndarray]], torch.Tensor]


@dataclass
class RankingMetrics:
    k: int
    users: int
    hit_rate: float  # HR@K, full ranking
    ndcg: float  # NDCG@K, full ranking
    recall: float  # recall@K, full ranking (one held-out item per shopper: equals hit_rate)
    hit_rate_sampled: float  # HR@K against sampled negatives
    ndcg_sampled: float
    coverage: float  # share of the catalogue in anyone's top-K
    protocol: str  # Protocol.describe()
    protocol_details: dict[str, str | int]  # Protocol.as_dict()

    def as_metrics(self, prefix: str) -> dict[str, float]:
        k = self.k
        return {
            f"{prefix}hr_at_{k}": self.hit_rate,
            f"{prefix}ndcg_at_{k}": self.ndcg,
            f"{prefix}recall_at_{k}": self.recall,
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
    full_ranks, sampled_ranks, recalls, recommended = [], [], [], []
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
        recalls.append(recall_at_k(scores, [targets[row : row + 1] for row in range(len(batch))], k))
        sampled_ranks.append(_sampled_ranks(scores, target_scores, histories, targets, sampled_negatives, rng))
        recommended.append(np.argpartition(-scores, kth=min(k, scores.shape[1] - 1), axis=1)[:, :k])
    if not len(users):
        raise ValueError("no shopper has a held-out item to evaluate on")
    full = np.concatenate(full_ranks)
    sampled = np.concatenate(sampled_ranks)
    protocol = Protocol(k=k, sampled_negatives=sampled_negatives, users=int(len(users)))
    return RankingMetrics(
        k=k,
        users=int(len(users)),
        hit_rate=float(np.mean(full < k)),
        ndcg=_ndcg(full, k),
        recall=float(np.mean(np.concatenate(recalls))),
        hit_rate_sampled=float(np.mean(sampled < k)),
        ndcg_sampled=_ndcg(sampled, k),
        coverage=float(len(np.unique(np.concatenate(recommended))) / train.n_items),
        protocol=protocol.describe(),
        protocol_details=protocol.as_dict(),
    )


def recall_at_k(scores: np.ndarray, held_out: list[np.ndarray], k: int) -> np.ndarray:
    """Recall@K of each row: the share of its held-out items ranked in the top ``k`` of ``scores``.

    ``scores`` is ``[rows, n_items]`` with the items to exclude (the training history) already at
    ``-inf``; ``held_out[row]`` holds that row's held-out items (at least one). An item's rank counts
    the items scored above it, the other held-out items included, plus half its ties, as HR@K does;
    so with one held-out item per row recall@K is HR@K.
    """
    if len(held_out) != len(scores):
        raise ValueError(f"held_out has {len(held_out)} rows, scores {len(scores)}")
    out = np.empty(len(held_out), dtype=np.float64)
    for row, items in enumerate(held_out):
        items = np.asarray(items, dtype=np.int64)
        if not len(items):
            raise ValueError(f"row {row} has no held-out item")
        row_scores = scores[row]
        ranks = _rank(np.broadcast_to(row_scores, (len(items), len(row_scores))), row_scores[items])
        out[row] = float(np.mean(ranks < k))
    return out


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
