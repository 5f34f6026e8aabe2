"""Recommend from a shopper's history alone, in the shop's own item ids.

The published artefact is the item table plus the id mapping: no shopper's parameters. A request
gives the shopper's recent items; the recommender folds them in (see :func:`fedml.models.mf.fold_in`)
and ranks the rest of the catalogue. Unknown items are reported back, not fatal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from fedml.data.ids import IdMap
from fedml.files import atomic_write_text
from fedml.models.ease import KIND as EASE
from fedml.models.ease import history_vectors
from fedml.models.mf import FOLD_IN_ITERATIONS, FoldInCatalogue, ItemTable, fold_in, score_all
from fedml.models.top_k import top_k

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
    fold_in_iterations: int = FOLD_IN_ITERATIONS
    # the table's fold-in terms shared by all shoppers, computed once per table (a server folds in per request)
    _catalogue: tuple[ItemTable, FoldInCatalogue] | None = field(default=None, init=False, repr=False, compare=False)

    def recommend(self, history: list[str], k: int = 10) -> Recommendation:
        """Top-``k`` items for a shopper who interacted with ``history`` (oldest first), seen items excluded."""
        return self.recommend_many([history], k)[0]

    def score(self, histories: list[np.ndarray]) -> torch.Tensor:
        """Scores of every item for shoppers given by their histories (item indices): fold-in, then rank.

        The evaluation protocol scores through this too, so that evaluated and served models agree.
        """
        with torch.no_grad():
            if self.table.kind == EASE:  # no fold-in: the history's 0/1 row times the item-item weights
                return score_all(self.table, history_vectors(histories, self.table.n_items))
            vectors = fold_in(
                self.table, histories, negatives=self.negatives, l2=self.fold_in_l2,
                iterations=self.fold_in_iterations, catalogue=self.fold_in_catalogue(),
            )  # fmt: skip
            return score_all(self.table, vectors)

    def fold_in_catalogue(self) -> FoldInCatalogue:
        """The table's fold-in terms shared by all shoppers (computed on first use, again if the table changes)."""
        if self._catalogue is None or self._catalogue[0] is not self.table:
            with torch.no_grad():
                self._catalogue = (self.table, FoldInCatalogue.of(self.table))
        return self._catalogue[1]

    def recommend_many(self, histories: list[list[str]], k: int = 10) -> list[Recommendation]:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        return self.serving.recommend_many(histories, [k] * len(histories))

    @cached_property
    def serving(self) -> ServingIndex:
        """The id lookup and ranking of requests (built once per recommender)."""
        return ServingIndex(self)

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
    """The serving path of a recommender: a batch of requests, each with its own k, and reasons.

    Scores come from :meth:`Recommender.score`, the fold-in and ranking that evaluation uses, so the
    service answers exactly what was evaluated. What is added for serving: a dict for the id lookup
    (cheaper per request than a lookup table built per call), each request's own k in one top-k,
    and for each recommendation the history item most like it (largest embedding dot product).
    """

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender
        self.position = {item: i for i, item in enumerate(recommender.ids.items)}
        self.q = recommender.table.embeddings.detach().to("cpu", torch.float32)
        if recommender.table.kind != EASE:
            recommender.fold_in_catalogue()  # now, while the model loads, not on the first request

    @property
    def n_items(self) -> int:
        return int(self.q.shape[0])

    def recommend_many(self, histories: list[list[str]], ks: list[int]) -> list[Recommendation]:
        """Top-``ks[r]`` unseen items for each history (oldest first), as :meth:`Recommender.recommend_many`."""
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
        scores = self.recommender.score(known)
        sizes = [len(seen) for seen in known]
        seen_rows = torch.as_tensor(np.repeat(np.arange(len(known)), sizes))
        scores[seen_rows, torch.as_tensor(np.concatenate(known))] = -torch.inf
        top_values, top_indices = top_k(scores, min(max(ks), self.n_items))
        because = self._because(known, top_indices)
        results = []
        for row, (seen, k) in enumerate(zip(known, ks)):
            take = min(k, self.n_items - len(seen))
            results.append(
                Recommendation(
                    items=self.recommender.ids.item_ids(top_indices[row, :take].numpy()),
                    scores=top_values[row, :take].tolist(),
                    unknown_items=unknown[row],
                    because=because[row][:take],
                )
            )
        return results

    def _because(self, known: list[np.ndarray], recommended: torch.Tensor) -> list[list[str | None]]:
        """For each recommended item, the history item with the largest embedding dot product (None: no history)."""
        width = max(len(seen) for seen in known)
        if width == 0:
            return [[None] * recommended.shape[1] for _ in known]
        padded = np.zeros((len(known), width), dtype=np.int64)
        padding = np.ones((len(known), width), dtype=bool)
        for row, seen in enumerate(known):
            padded[row, : len(seen)], padding[row, : len(seen)] = seen, False
        dots = torch.bmm(self.q[recommended], self.q[torch.as_tensor(padded)].transpose(1, 2))  # [rows, k, width]
        closest = dots.masked_fill_(torch.as_tensor(padding)[:, None, :], -torch.inf).argmax(2).numpy()
        return [
            self.recommender.ids.item_ids(seen[closest[row]]) if len(seen) else [None] * recommended.shape[1]
            for row, seen in enumerate(known)
        ]
