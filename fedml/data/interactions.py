"""Per-shopper training positives in compressed sparse rows: what the clients hold."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class UserItems:
    """Each shopper's distinct positive items, as contiguous indices (CSR layout).

    ``items[indptr[u]:indptr[u + 1]]`` are shopper ``u``'s items. In the federated path a row is
    one client's private data and is only ever read by that client's update.
    """

    indptr: np.ndarray  # int64 [n_users + 1]
    items: np.ndarray  # int64 [nnz]
    n_users: int
    n_items: int

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> UserItems:
        """Build from (user, item) index pairs; duplicates are dropped, items sorted per user."""
        users = np.asarray(users, dtype=np.int64)
        items = np.asarray(items, dtype=np.int64)
        keys = np.sort(users * n_items + items)  # sort + diff: np.unique is slow on large int64 arrays
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])] if len(keys) else keys
        u, i = np.divmod(keys, n_items)
        counts = np.bincount(u, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr=indptr, items=i.astype(np.int64), n_users=n_users, n_items=n_items)

    def of(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user] : self.indptr[user + 1]]

    def counts(self) -> np.ndarray:
        return np.diff(self.indptr)

    def users(self) -> np.ndarray:
        """The user index of every stored pair (aligned with ``items``)."""
        return np.repeat(np.arange(self.n_users, dtype=np.int64), self.counts())

    @property
    def nnz(self) -> int:
        return int(self.items.shape[0])

    def item_popularity(self) -> np.ndarray:
        return np.bincount(self.items, minlength=self.n_items)
