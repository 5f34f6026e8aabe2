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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload

import numpy as np

from fedml.data.ragged import Ragged

_U = np.uint64
_ORDER_STREAM = _U(0x6F72646572)  # "order"
_NEGATIVE_STREAM = _U(0x6E65676174697665)  # "negative"


@dataclass(frozen=True)
class LocalDraws:
    """One client's draws for its local epochs."""

    order: np.ndarray  # int64 [epochs, n]: the positions of the positives, per epoch
    negatives: np.ndarray  # int64 [epochs, n, k]: item indices


@dataclass(frozen=True, eq=False)
class RoundDraws(Sequence[LocalDraws]):
    """The draws of a round's clients (or a contiguous run of them), client by client in flat arrays.

    Item ``i`` is client ``i``'s :class:`LocalDraws` (read-only views); a slice is the draws of those
    clients. The batched engine reads the flat arrays directly.
    """

    starts: np.ndarray  # int64 [C + 1]: client i's positives are positions starts[i]:starts[i + 1] of all
    epochs: int
    k: int  # negatives per positive
    orders: np.ndarray  # int64 [epochs * starts[-1]]: each client's order [epochs, n], flattened
    negatives: np.ndarray  # int64 [epochs * k * starts[-1]]: each client's negatives [epochs, n, k], flattened

    @classmethod
    def of(cls, draws: Sequence[LocalDraws], epochs: int, k: int) -> RoundDraws:
        """The flat form of some clients' draws (each with ``epochs`` epochs and ``k`` negatives)."""
        if isinstance(draws, RoundDraws):
            if (draws.epochs, draws.k) != (epochs, k):
                raise ValueError(f"draws of {draws.epochs} epochs x {draws.k} negatives, not {epochs} x {k}")
            return draws
        sizes = np.array([d.order.shape[1] for d in draws], dtype=np.int64)
        flat = [np.asarray(d.negatives, dtype=np.int64).ravel() for d in draws]
        return cls(
            starts=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
            epochs=epochs,
            k=k,
            orders=concat_int64([np.asarray(d.order, dtype=np.int64).ravel() for d in draws]),
            negatives=concat_int64(flat),
        )

    @property
    def sizes(self) -> np.ndarray:
        """int64 ``[C]``: each client's number of positives."""
        return np.diff(self.starts)

    def __len__(self) -> int:
        return len(self.starts) - 1

    @overload
    def __getitem__(self, i: int) -> LocalDraws: ...
    @overload
    def __getitem__(self, i: slice) -> RoundDraws: ...
    def __getitem__(self, i: int | slice) -> LocalDraws | RoundDraws:
        e, k = self.epochs, self.k
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step != 1:
                raise ValueError("RoundDraws slices must be contiguous (step 1)")
            hi = max(lo, hi)
            a, b = self.starts[lo], self.starts[hi]
            return RoundDraws(
                self.starts[lo : hi + 1] - a, e, k, self.orders[e * a : e * b], self.negatives[e * k * a : e * k * b]
            )
        if not -len(self) <= i < len(self):
            raise IndexError(f"client {i} of {len(self)}")
        i %= len(self)
        a, b = int(self.starts[i]), int(self.starts[i + 1])
        return LocalDraws(
            order=self.orders[e * a : e * b].reshape(e, b - a),
            negatives=self.negatives[e * k * a : e * k * b].reshape(e, b - a, k),
        )

    def __iter__(self) -> Iterator[LocalDraws]:
        return (self[i] for i in range(len(self)))


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
) -> RoundDraws:
    """The draws of every client of a round (``positives[i]``: client ``clients[i]``'s sorted items)."""
    clients = np.asarray(clients, dtype=np.int64)
    if len(clients) != len(positives):
        raise ValueError(f"{len(clients)} clients but {len(positives)} positive lists")
    rows = Ragged.of(positives)
    sizes, flat = rows.sizes, rows.flat
    if not _sorted_unique_per_client(flat, sizes):
        raise ValueError("each client's positives must be sorted and unique (as UserItems.of returns them)")
    keys = client_keys(seed, round_index, clients)
    orders = _orders(keys, sizes, epochs)
    negs = _negatives(keys, flat, sizes, n_items, epochs, negatives)
    orders.flags.writeable = negs.flags.writeable = False  # shared by every client's view
    return RoundDraws(np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), epochs, negatives, orders, negs)


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


def _orders(keys: np.ndarray, sizes: np.ndarray, epochs: int) -> np.ndarray:
    """Client by client: ``epochs`` random permutations of ``range(n)``, all concatenated."""
    lengths = sizes * epochs
    owner, counter = _counters(keys, lengths)
    random = _splitmix(keys[owner] ^ _ORDER_STREAM ^ counter.astype(_U))
    segment = owner * (epochs + 1) + counter // np.maximum(sizes[owner], 1)  # (client, epoch)
    # sorted by (segment, random): by random first, then stably by segment. SplitMix64 is a bijection,
    # so a client's values are distinct and the first sort needs no stability.
    by_random = np.argsort(random)
    by_key = by_random[np.argsort(segment[by_random], kind="stable")]
    return counter[by_key] % np.maximum(sizes[owner[by_key]], 1)


def _negatives(keys: np.ndarray, flat: np.ndarray, sizes: np.ndarray, n_items: int, epochs: int, k: int) -> np.ndarray:
    """Client by client: ``epochs * n * k`` items drawn uniformly from the client's complement, concatenated."""
    lengths = sizes * epochs * k
    owner, counter = _counters(keys, lengths)
    random = _splitmix(keys[owner] ^ _NEGATIVE_STREAM ^ counter.astype(_U))
    free = n_items - sizes  # size of each client's complement
    whole_catalogue = free[owner] <= 0  # a client with every item: plain uniform draws
    rank = (random % np.maximum(free[owner], 1).astype(_U)).astype(np.int64)
    rank[whole_catalogue] = (random[whole_catalogue] % _U(n_items)).astype(np.int64)
    items = rank + _positives_at_or_below(flat, sizes, owner, rank, n_items)
    items[whole_catalogue] = rank[whole_catalogue]
    return items


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


def concat_int64(arrays: list[np.ndarray]) -> np.ndarray:
    """int64 concatenation of possibly no arrays."""
    return np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
