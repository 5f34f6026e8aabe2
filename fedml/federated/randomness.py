"""The random draws of local training, derived from (seed, round, client) alone.

A client's mini-batch orders and sampled negatives are a pure function of the run's seed, the round
and the client's index: a device can compute its own draws, and a round gives the same result
whichever engine runs it (one client at a time, all clients batched, shards on a cluster) and
however its clients are split into shards. The draws come from a counter-based hash (SplitMix64)
and are vectorised over all clients of a round.

* order: each epoch visits the client's positives in the order of their hashed keys (a uniformly
  random permutation);
* negatives: uniform over the items the client has *not* interacted with, drawn directly from that
  complement (no rejection loop).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_U = np.uint64
_ORDER_STREAM = _U(0x6F72646572)  # "order"
_NEGATIVE_STREAM = _U(0x6E65676174697665)  # "negative"


@dataclass(frozen=True)
class LocalDraws:
    """One client's draws for its local epochs."""

    order: np.ndarray  # int64 [epochs, n]: the positions of the positives, per epoch
    negatives: np.ndarray  # int64 [epochs, n, k]: item indices


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + _U(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U(30))) * _U(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U(27))) * _U(0x94D049BB133111EB)
    return x ^ (x >> _U(31))


def client_keys(seed: int, round_index: int, clients: np.ndarray) -> np.ndarray:
    """One 64-bit key per client for this round."""
    clients = np.asarray(clients, dtype=np.int64).astype(_U)
    base = _splitmix(_splitmix(np.array([seed], dtype=np.int64).astype(_U)) ^ _U(round_index))
    return _splitmix(base ^ clients)


def draw_round(
    seed: int,
    round_index: int,
    clients: Sequence[int] | np.ndarray,
    positives: Sequence[np.ndarray],
    n_items: int,
    epochs: int,
    negatives: int,
) -> list[LocalDraws]:
    """The draws of every client of a round (``positives[i]``: client ``clients[i]``'s sorted items)."""
    clients = np.asarray(clients, dtype=np.int64)
    if len(clients) != len(positives):
        raise ValueError(f"{len(clients)} clients but {len(positives)} positive lists")
    sizes = np.array([len(p) for p in positives], dtype=np.int64)
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in positives] or [np.zeros(0, np.int64)])
    if not _sorted_unique_per_client(flat, sizes):
        raise ValueError("each client's positives must be sorted and unique (as UserItems.of returns them)")
    keys = client_keys(seed, round_index, clients)
    orders = _orders(keys, sizes, epochs)
    negs = _negatives(keys, flat, sizes, n_items, epochs, negatives)
    draws = []
    for i, n in enumerate(sizes):
        draws.append(LocalDraws(order=orders[i].reshape(epochs, n), negatives=negs[i].reshape(epochs, n, negatives)))
    return draws


def _sorted_unique_per_client(flat: np.ndarray, sizes: np.ndarray) -> bool:
    """``flat``: all clients' positives concatenated (``sizes`` each)."""
    if len(flat) < 2:
        return True
    increasing = np.diff(flat) > 0
    starts = np.cumsum(sizes)[:-1]  # positions where a new client's run begins in `flat`
    increasing[starts[(starts > 0) & (starts < len(flat))] - 1] = True  # no order across clients
    return bool(increasing.all())


def _counters(keys: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: its client's position and its counter within the client's stream."""
    owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    starts = np.cumsum(lengths) - lengths
    counter = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(starts, lengths)
    return owner, counter


def _orders(keys: np.ndarray, sizes: np.ndarray, epochs: int) -> list[np.ndarray]:
    """Per client: ``epochs`` random permutations of ``range(n)``, concatenated."""
    lengths = sizes * epochs
    owner, counter = _counters(keys, lengths)
    random = _splitmix(keys[owner] ^ _ORDER_STREAM ^ counter.astype(_U))
    segment = owner * (epochs + 1) + counter // np.maximum(sizes[owner], 1)  # (client, epoch)
    by_key = np.lexsort((random, segment))
    position = counter[by_key] % np.maximum(sizes[owner[by_key]], 1)
    return np.split(position, np.cumsum(lengths)[:-1])


def _negatives(
    keys: np.ndarray, flat: np.ndarray, sizes: np.ndarray, n_items: int, epochs: int, k: int
) -> list[np.ndarray]:
    """Per client: ``epochs * n * k`` items drawn uniformly from the client's complement."""
    lengths = sizes * epochs * k
    owner, counter = _counters(keys, lengths)
    random = _splitmix(keys[owner] ^ _NEGATIVE_STREAM ^ counter.astype(_U))
    free = n_items - sizes  # size of each client's complement
    whole_catalogue = free[owner] <= 0  # a client with every item: plain uniform draws
    rank = (random % np.maximum(free[owner], 1).astype(_U)).astype(np.int64)
    rank[whole_catalogue] = (random[whole_catalogue] % _U(n_items)).astype(np.int64)
    items = rank + _positives_at_or_below(flat, sizes, owner, rank, n_items)
    items[whole_catalogue] = rank[whole_catalogue]
    return np.split(items, np.cumsum(lengths)[:-1])


def _positives_at_or_below(
    flat: np.ndarray, sizes: np.ndarray, owner: np.ndarray, rank: np.ndarray, n_items: int
) -> np.ndarray:
    """How many of the client's positives precede its ``rank``-th non-positive item.

    With sorted positives p_j, the r-th free item is r + #{j : p_j - j <= r}; one searchsorted over
    all clients at once, each client's values offset into its own band.
    """
    band = np.int64(n_items + 1)
    within = np.arange(len(flat), dtype=np.int64) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    client = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
    shifted = client * band + (flat - within)
    starts = np.cumsum(sizes) - sizes
    return np.searchsorted(shifted, owner * band + rank, side="right") - starts[owner]
