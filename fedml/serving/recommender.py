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
        settings = {"negatives": self.negatives, "fold_in_l2": self.fold_in_l2, "fold_in_iterations": self.fold_in_iterations}
        atomic_write_text(directory / SETTINGS_FILE, json.dumps(settings, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Recommender:
        directory = Path(directory)
        with np.load(directory / WEIGHTS_FILE) as arrays:
            table = ItemTable.from_numpy(dict(arrays))
        settings = json.loads((directory / SETTINGS_FILE).read_text())
        return cls(table=table, ids=IdMap.from_json(directory / IDS_FILE), **settings)
