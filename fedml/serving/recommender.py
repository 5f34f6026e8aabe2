"""Recommend from a shopper's history alone, in the shop's own item ids.

The published artefact is the item table plus the id mapping: no shopper's parameters. A request
gives the shopper's recent items; the recommender folds them in (see :func:`fedml.models.mf.fold_in`)
and ranks the rest of the catalogue. Unknown items are reported back, not fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedml.data.ids import IdMap
from fedml.files import atomic_write_text
from fedml.models.mf import ItemTable, fold_in, score_all

WEIGHTS_FILE = "item_table.npz"
IDS_FILE = "ids.json"
SETTINGS_FILE = "recommender.json"


@dataclass
class Recommendation:
    items: list[str]
    scores: list[float]
    unknown_items: list[str] = field(default_factory=list)
    # per recommended item: the history item most like it (embedding dot product); None on a cold start
    because: list[str | None] = field(default_factory=list)


@dataclass
class Recommender:
    table: ItemTable
    ids: IdMap
    negatives: int = 4
    fold_in_l2: float = 1.0
    fold_in_iterations: int = 4

    def recommend(self, history: list[str], k: int = 10) -> Recommendation:
        """Top-``k`` items for a shopper who interacted with ``history`` (oldest first), seen items excluded."""
        return self.recommend_many([history], k)[0]

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Scores of every item for shoppers given by their histories (item indices): fold-in, then rank.

        The evaluation protocol scores through this too, so that evaluated and served models agree.
        """
        with torch.no_grad():
            vectors = fold_in(
                self.table, histories, negatives=self.negatives, l2=self.fold_in_l2, iterations=self.fold_in_iterations
            )
            return score_all(self.table, vectors)

    def recommend_many(self, histories: list[list[str]], k: int = 10) -> list[Recommendation]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        known, unknown = [], []
        for history in histories:
            indices = self.ids.item_index([str(i) for i in history], errors="ignore")
            known.append(np.unique(indices[indices >= 0]))
            unknown.append([str(i) for i, idx in zip(history, indices) if idx < 0])
        scores = self.score(known)
        results = []
        for row, seen in enumerate(known):
            row_scores = scores[row].clone()
            row_scores[torch.as_tensor(seen, dtype=torch.long)] = -torch.inf
            top = torch.topk(row_scores, k=min(k, self.table.n_items - len(seen)))
            results.append(
                Recommendation(
                    items=self.ids.item_ids(top.indices.numpy()),
                    scores=[float(s) for s in top.values],
                    unknown_items=unknown[row],
                )
            )
        return results

    def save(self, directory: str | Path) -> Path:
        """Write the item table, the id mapping and the fold-in settings into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.savez(directory / WEIGHTS_FILE, **self.table.to_numpy())
        # item ids only: the published model carries no shopper ids
        IdMap(users=[], items=list(self.ids.items)).to_json(directory / IDS_FILE)
        settings = {
            "negatives": self.negatives,
            "fold_in_l2": self.fold_in_l2,
            "fold_in_iterations": self.fold_in_iterations,
        }
        atomic_write_text(directory / SETTINGS_FILE, json.dumps(settings, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Recommender:
        directory = Path(directory)
        with np.load(directory / WEIGHTS_FILE) as arrays:
            table = ItemTable.from_numpy(dict(arrays))
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        return cls(table=table, ids=IdMap.from_json(directory / IDS_FILE), **settings)


class ServingIndex:
    """The serving hot path: the same fold-in optimum as :meth:`Recommender.score`, for a batch of requests.

    :func:`fedml.models.mf.fold_in` takes exact Newton steps, whose Hessians cost ``n_items * dim^2``
    per shopper; on a large catalogue that dominates a request. Here the Hessian is split: the
    history's own terms (a few items) are exact at every step, and the whole-catalogue negative term
    starts exact at ``p = 0`` (precomputed once per model) and is then updated by BFGS from the exact
    gradients. So the first step is fold-in's first Newton step and each later one costs two passes
    over the float32 item matrix. A shopper stops once a step moves no coordinate more than
    ``tolerance``; the scores returned are those at the final vector. Same objective, same optimum:
    the result agrees with a converged ``fold_in`` to about the tolerance.
    """

    def __init__(self, recommender: Recommender, tolerance: float = 1e-3, max_steps: int = 30) -> None:
        self.recommender = recommender
        self.position = {item: i for i, item in enumerate(recommender.ids.items)}  # faster than a lookup per call
        self.tolerance = tolerance
        self.max_steps = max_steps
        table = recommender.table
        self.q = table.embeddings.detach().to("cpu", torch.float32).contiguous()
        self.q_t = self.q.T.contiguous()
        self.b = table.bias.detach().to("cpu", torch.float32).contiguous()
        self.q64 = self.q.double().numpy()
        # at p = 0 every shopper's scores are the biases: the catalogue's part of the first gradient
        # and Hessian is the same for all, computed once here
        self.s0 = 1.0 / (1.0 + np.exp(-self.b.double().numpy()))
        self.w0 = self.s0 * (1.0 - self.s0)
        self.grad0 = self.s0 @ self.q64
        self.hessian0 = (self.q64 * self.w0[:, None]).T @ self.q64

    @property
    def n_items(self) -> int:
        return int(self.q.shape[0])

    def recommend_many(self, histories: list[list[str]], ks: list[int]) -> list[Recommendation]:
        """Top-``ks[r]`` unseen items for each history, with the history item each is most like."""
        if len(ks) != len(histories):
            raise ValueError(f"one k per history: {len(ks)} ks for {len(histories)} histories")
        if any(k < 1 for k in ks):
            raise ValueError(f"k must be at least 1, got {min(ks)}")
        if not histories:
            return []
        known, unknown = [], []
        for history in histories:
            indices = [self.position.get(str(item), -1) for item in history]
            known.append(np.unique(np.array([i for i in indices if i >= 0], dtype=np.int64)))
            unknown.append([str(item) for item, i in zip(history, indices) if i < 0])
        with torch.no_grad():
            scores = self.scores(known)
            for row, seen in enumerate(known):
                scores[row, torch.as_tensor(seen, dtype=torch.long)] = -torch.inf
            top_values, top_indices = torch.topk(scores, k=min(max(ks), self.n_items), dim=1)
        results = []
        for row, (seen, k) in enumerate(zip(known, ks)):
            take = min(k, self.n_items - len(seen))
            indices = top_indices[row, :take]
            results.append(
                Recommendation(
                    items=self.recommender.ids.item_ids(indices.numpy()),
                    scores=top_values[row, :take].tolist(),
                    unknown_items=unknown[row],
                    because=self._because(seen, indices),
                )
            )
        return results

    def _because(self, seen: np.ndarray, indices: torch.Tensor) -> list[str | None]:
        """For each recommended item, the history item with the largest embedding dot product."""
        if len(seen) == 0:
            return [None] * len(indices)
        closest = (self.q[indices] @ self.q[torch.as_tensor(seen, dtype=torch.long)].T).argmax(dim=1)
        return self.recommender.ids.item_ids(seen[closest.numpy()])

    def scores(self, histories: list[np.ndarray]) -> torch.Tensor:
        """``[len(histories), n_items]`` scores at each shopper's folded-in vector (histories: unique indices).

        The passes over the catalogue are torch matrix products; the small per-shopper algebra
        (``dim x dim`` Hessians) is numpy, whose per-call overhead is a fraction of torch's.
        """
        rec, n, dim = self.recommender, self.n_items, self.q.shape[1]
        out = self.b.repeat(len(histories), 1)  # an empty history's optimum is p = 0: the biases
        rows = np.array([r for r, h in enumerate(histories) if len(h)], dtype=np.int64)
        if not len(rows):
            return out
        width = max(len(histories[r]) for r in rows)
        hist = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros((len(rows), width))
        for j, r in enumerate(rows):
            hist[j, : len(histories[r])] = histories[r]
            mask[j, : len(histories[r])] = 1.0
        sizes = mask.sum(1)
        c = rec.negatives * sizes / np.maximum(n - sizes, 1.0)  # expected negative weight, as in fold_in
        q_hist = self.q64[hist] * mask[..., None]  # [rows, width, dim]; padding rows are zero
        eye = rec.fold_in_l2 * np.eye(dim)
        # negative term over every item but the history's: exact at p = 0, then BFGS
        neg_hessian = c[:, None, None] * (self.hessian0 - _weighted_gram(self.w0[hist] * mask, q_hist))
        p = np.zeros((len(rows), dim))
        neg_grad, pos_grad, pos_hessian = _terms(self.grad0, self.s0[hist] * mask, mask, q_hist, c)
        active = np.arange(len(rows))  # which of ``rows`` are still being solved
        for _ in range(self.max_steps):
            grad = neg_grad + pos_grad + rec.fold_in_l2 * p
            step = -np.linalg.solve(neg_hessian + pos_hessian + eye, grad[..., None])[..., 0]
            p = p + step
            z = torch.addmm(self.b, torch.from_numpy(p.astype(np.float32)), self.q_t)
            s = torch.sigmoid(z)
            s_hist = s.numpy()[np.arange(len(active))[:, None], hist].astype(np.float64) * mask
            catalogue_grad = (s @ self.q).numpy().astype(np.float64)
            new_neg_grad, pos_grad, pos_hessian = _terms(catalogue_grad, s_hist, mask, q_hist, c)
            done = np.abs(step).max(axis=1) <= self.tolerance
            if done.any():
                out[torch.from_numpy(rows[active[done]])] = z[torch.from_numpy(done)]
                if done.all():
                    return out
            neg_hessian = _bfgs_update(neg_hessian, step, new_neg_grad - neg_grad)
            neg_grad = new_neg_grad
            if done.any():
                keep = ~done
                active, p, neg_grad, pos_grad, neg_hessian = (
                    active[keep],
                    p[keep],
                    neg_grad[keep],
                    pos_grad[keep],
                    neg_hessian[keep],
                )
                pos_hessian, hist, mask, q_hist, c = pos_hessian[keep], hist[keep], mask[keep], q_hist[keep], c[keep]
        out[torch.from_numpy(rows[active])] = z[torch.from_numpy(~done)] if done.any() else z
        return out


def _terms(
    catalogue_grad: np.ndarray, s_hist: np.ndarray, mask: np.ndarray, q_hist: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradient of the negative term, gradient and Hessian of the history's own term, from the
    catalogue sum ``sum_j sigmoid(z_j) q_j`` and the history's sigmoids ``s_hist`` (zero-padded)."""
    neg_grad = c[:, None] * (catalogue_grad - _weighted_sum(s_hist, q_hist))
    pos_grad = _weighted_sum(s_hist - mask, q_hist)
    pos_hessian = _weighted_gram(s_hist * (1.0 - s_hist), q_hist)
    return neg_grad, pos_grad, pos_hessian


def _weighted_sum(weights: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``sum_l weights[r, l] * vectors[r, l]``: ``[rows, width] x [rows, width, dim] -> [rows, dim]``."""
    return (weights[:, None, :] @ vectors)[:, 0, :]


def _weighted_gram(weights: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``sum_l weights[r, l] * outer(vectors[r, l])``: ``-> [rows, dim, dim]``."""
    return (vectors * weights[..., None]).transpose(0, 2, 1) @ vectors


def _bfgs_update(hessian: np.ndarray, step: np.ndarray, change: np.ndarray) -> np.ndarray:
    """BFGS update of a batch of Hessian approximations from steps and gradient changes."""
    hs = (hessian @ step[..., None])[..., 0]
    ys, shs = (change * step).sum(1), (step * hs).sum(1)
    curved = (ys > 1e-12) & (shs > 1e-12)  # always on a convex loss, unless the step vanished
    ys, shs = np.where(curved, ys, 1.0), np.where(curved, shs, 1.0)
    update = (
        change[:, :, None] * change[:, None, :] / ys[:, None, None]
        - hs[:, :, None] * hs[:, None, :] / shs[:, None, None]
    )
    return hessian + update * curved[:, None, None]
