"""A tiny shop with obvious structure, shared by tests: shoppers take items from their own cluster."""

from __future__ import annotations

import numpy as np

from fedml.data.interactions import UserItems


def clustered_shop(n_users: int, n_items: int, clusters: int, per_user: int) -> tuple[UserItems, np.ndarray]:
    """Shopper ``u`` has ``per_user`` items of cluster ``u % clusters`` and one held-out item from it."""
    rng = np.random.default_rng(0)
    size = n_items // clusters
    users, items, test = [], [], np.empty(n_users, dtype=np.int64)
    for user in range(n_users):
        chosen = rng.choice(size, per_user + 1, replace=False) + (user % clusters) * size
        users += [user] * per_user
        items += chosen[:-1].tolist()
        test[user] = chosen[-1]
    return UserItems.from_pairs(np.array(users), np.array(items), n_users, n_items), test
