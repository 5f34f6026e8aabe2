"""Leave-last-out split: each shopper's most recent item is held out for evaluation.

Every row is a positive (a view, cart, purchase, favourite or rating), except rating rows below
``min_rating``: those are dropped before the split and take part in nothing (neither choose the
held-out item nor enter training). The held-out item is the item of the shopper's last positive
row by ``timestamp``; a tie on the timestamp goes to the later row of the frame (logs are
appended in order). A shopper with fewer than two distinct positive items holds nothing out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedml.data.ids import IdMap
from fedml.data.interactions import UserItems
from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER

NO_TEST_ITEM = -1


@dataclass
class Split:
    train: UserItems  # each shopper's distinct positive items, the held-out one excluded
    test_items: np.ndarray  # int64 [n_users]: the held-out item index, NO_TEST_ITEM if none
    train_frame: pd.DataFrame  # the canonical positive rows behind `train` (fresh RangeIndex)

    def test_users(self) -> np.ndarray:
        """Indices of the shoppers that have a held-out item."""
        return np.flatnonzero(self.test_items != NO_TEST_ITEM)


def leave_last_out(df: pd.DataFrame, ids: IdMap, *, min_rating: float | None = None) -> Split:
    """Hold out each shopper's last item; train on all their rows of the other items."""
    users = ids.user_index(df[USER])
    items = ids.item_index(df[ITEM])
    positive = positive_mask(df, min_rating)
    test_items = _last_items(users[positive], items[positive], df[TIMESTAMP].to_numpy(np.int64)[positive], ids)
    held_out = test_items[users]  # NO_TEST_ITEM never equals an item index
    keep = positive & (items != held_out)
    return Split(
        train=UserItems.from_pairs(users[keep], items[keep], ids.n_users, ids.n_items),
        test_items=test_items,
        train_frame=df.loc[keep].reset_index(drop=True),
    )


def positive_mask(df: pd.DataFrame, min_rating: float | None = None) -> np.ndarray:
    """Rows that count as positives: all but rating rows with ``rating < min_rating``."""
    if min_rating is None:
        return np.ones(len(df), dtype=bool)
    low = (df[EVENT] == "rating").to_numpy(bool) & (df[RATING].to_numpy(np.float64) < min_rating)
    return ~low


def distinct_counts(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> np.ndarray:
    """Number of distinct items of each user (sort-based; ``np.unique`` is slow on int64 keys)."""
    keys = np.sort(np.asarray(users, dtype=np.int64) * n_items + np.asarray(items, dtype=np.int64))
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    return np.bincount(keys[first] // n_items, minlength=n_users)


def _last_items(users: np.ndarray, items: np.ndarray, times: np.ndarray, ids: IdMap) -> np.ndarray:
    """Item of each user's last row by (timestamp, row), or NO_TEST_ITEM below two distinct items."""
    order = np.lexsort((times, users))  # stable: equal timestamps keep their row order
    sorted_users = users[order]
    is_last = np.ones(len(order), dtype=bool)
    is_last[:-1] = sorted_users[1:] != sorted_users[:-1]
    last = np.full(ids.n_users, NO_TEST_ITEM, dtype=np.int64)
    last[sorted_users[is_last]] = items[order[is_last]]
    enough = distinct_counts(users, items, ids.n_users, ids.n_items) >= 2
    return np.where(enough, last, NO_TEST_ITEM)


__all__ = ["Split", "leave_last_out", "positive_mask", "distinct_counts", "NO_TEST_ITEM"]
