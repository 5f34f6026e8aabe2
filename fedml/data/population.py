"""A synthetic shop of millions of shoppers, generated lazily, block by block.

:func:`fedml.data.synthetic.generate_shop` materialises the whole interaction log as one frame:
fine for thousands of shoppers, not for millions. :class:`LazyShop` is the same shop model (the
same catalogue code and the same shopper model, :func:`~fedml.data.synthetic._shopper_events`)
cut into blocks of ``block_size`` shoppers, each generated on demand and thrown away again, so
that memory follows the clients of a round, not the population.

**Determinism.** The catalogue comes from ``np.random.default_rng(seed)``, exactly as in
``generate_shop`` (same ``seed``, ``n_items``, ``n_categories`` → same item categories and
popularity). Block ``b`` (shoppers ``[b * block_size, (b + 1) * block_size)``) is generated from
its own stream, ``SeedSequence(seed, spawn_key=(b,))`` (child ``b`` of ``SeedSequence(seed)``).
A shopper's interactions are therefore a function of ``(seed, n_items, n_categories,
mean_sessions, block_size, shopper index)`` only: not of the cache state, of the order of the
requests or of which other clients are asked for. Every block is generated at its full
``block_size`` and cut to the population, so they do not depend on ``n_shoppers`` either: a shop
of 3,000 shoppers is the first 3,000 shoppers of a shop of a million (with the same
``block_size``). A change of ``block_size`` gives a different (equally valid) population.

**Split.** Leave-last-out as in :func:`fedml.data.split.leave_last_out` on the block's canonical
frame: a shopper's last event (by time, then funnel stage, then item: the frame's row order) is
held out, every other distinct item is a train positive. Indices are the generator's own: shopper
``u`` is ``shopper_ids(n)[u]`` and item ``i`` is ``product_ids(n_items)[i]``, with the whole
catalogue indexed (also items nobody touched), so ``n_items`` is the catalogue size.

**Contract with the round loop** (the ``ClientData`` protocol: ``n_users``, ``n_items``,
``counts()``, ``of(client)``):

* ``counts()`` — distinct train items of every shopper, int32 ``[n_users]`` (4 MB at a million).
  The first call streams every block once (seconds per million shoppers); the result is cached.
* ``round_data(clients) -> RoundData`` — **the per-round API.** Call it once per round with the
  round's sampled clients (unique global shopper indices). It generates each block those clients
  fall in once, and returns a small CSR (:class:`~fedml.data.interactions.UserItems`) with one
  row per client, in the order given, and the mapping back: ``RoundData.of(client)`` takes the
  *global* shopper index, so a loop written ``data.of(client)`` works unchanged once ``data`` is
  that round's :class:`RoundData`.
* ``of(client)`` — one shopper's train items through the block cache (LRU, at most
  ``max_cached_blocks`` blocks). Cheap when the clients come in ascending order (what
  ``poisson_sample`` returns: each block is generated once per pass), but every cache miss
  regenerates a whole block (tens of milliseconds), so a loop over clients in random order must
  use ``round_data``.

Cost. Time: a block of 10,000 shoppers takes well under a tenth of a second; a round whose
clients are sampled uniformly from the whole population touches nearly every block (10,000 of
1,000,000 shoppers in blocks of 10,000: all 100 blocks), so one round's data costs about one pass
over the population in time, though never in memory. Memory: the catalogue (O(n_items)), the
cached ``counts()`` (O(n_shoppers) int32), one block being generated, the cached blocks' train
CSRs (about 0.6 MB each at 10,000 shoppers) and the round's own rows. Raising
``max_cached_blocks`` to ``n_blocks`` keeps every block's train CSR (about 60 MB per million
shoppers) and makes later rounds cache hits: a trade of memory for time left to the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fedml.data.interactions import UserItems
from fedml.data.ragged import ranges
from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER
from fedml.data.split import NO_TEST_ITEM, distinct_counts
from fedml.data.synthetic import (
    FUNNEL,
    _check_sizes,
    _make_catalogue,
    _shopper_events,
    _unix,
    product_ids,
    shopper_ids,
)

DEFAULT_BLOCK_SIZE = 10_000
DEFAULT_CACHED_BLOCKS = 8


@dataclass(frozen=True)
class ShopperBlock:
    """The raw event log of shoppers ``start..stop-1``, in the canonical frame's row order."""

    start: int
    stop: int
    shopper: np.ndarray  # int64: global shopper index
    item: np.ndarray  # int64: item index (the product number)
    time: np.ndarray  # int64: seconds after the shop's start
    stage: np.ndarray  # int8: index into synthetic.FUNNEL (view, cart, purchase)
    n_shoppers: int  # of the whole shop (sets the width of the shopper ids)
    n_items: int

    def frame(self, start: str | pd.Timestamp = "2026-01-01") -> pd.DataFrame:
        """The block as a canonical interactions frame, ids as ``generate_shop`` writes them."""
        users = shopper_ids(self.n_shoppers, self.start, self.stop)
        return pd.DataFrame(
            {
                USER: pd.array(users, dtype="str").take(self.shopper - self.start),
                ITEM: pd.array(product_ids(self.n_items), dtype="str").take(self.item),
                EVENT: pd.array(np.array(FUNNEL), dtype="str").take(self.stage.astype(np.int64)),
                RATING: np.full(len(self.item), np.nan),
                TIMESTAMP: _unix(start) + self.time,
            }
        )


@dataclass(frozen=True, eq=False)
class RoundData:
    """One round's clients and their private train positives: what the round loop reads.

    ``train`` has one row per client, row ``r`` belonging to global shopper ``clients[r]``;
    :meth:`of` and :meth:`test_item` take the global shopper index.
    """

    clients: np.ndarray  # int64 [k]: global shopper indices, unique, in the order requested
    train: UserItems  # k rows, n_items = the shop's catalogue size
    test_items: np.ndarray  # int64 [k]: each client's held-out item, NO_TEST_ITEM if none
    _sorter: np.ndarray = field(init=False, repr=False)  # argsort of clients, for row()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_sorter", np.argsort(self.clients, kind="stable"))

    @property
    def n_users(self) -> int:
        return len(self.clients)

    @property
    def n_items(self) -> int:
        return self.train.n_items

    def row(self, client: int) -> int:
        """Row of global shopper ``client`` in ``train`` (KeyError if not in this round)."""
        pos = int(np.searchsorted(self.clients, client, sorter=self._sorter))
        if pos == len(self.clients) or self.clients[self._sorter[pos]] != client:
            raise KeyError(f"shopper {client} is not a client of this round")
        return int(self._sorter[pos])

    def of(self, client: int) -> np.ndarray:
        """Train positives of global shopper ``client``."""
        return self.train.of(self.row(client))

    def test_item(self, client: int) -> int:
        return int(self.test_items[self.row(client)])

    def counts(self) -> np.ndarray:
        """Distinct train items per row (aligned with ``clients``)."""
        return self.train.counts()


@dataclass(frozen=True)
class _BlockSplit:
    """Leave-last-out of one block, rows local to the block."""

    indptr: np.ndarray  # int64 [len + 1]
    items: np.ndarray  # int32 (int64 for catalogues beyond 2**31 items)
    test: np.ndarray  # int64 [len]


class LazyShop:
    """A synthetic shop whose shoppers are generated on demand, deterministically per shopper block.

    See the module docstring for the determinism guarantees and the round-loop contract.
    """

    def __init__(
        self,
        n_shoppers: int,
        n_items: int,
        n_categories: int,
        *,
        mean_sessions: float = 6.0,
        seed: int = 7,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_cached_blocks: int = DEFAULT_CACHED_BLOCKS,
    ) -> None:
        _check_sizes(n_shoppers, n_items, n_categories, mean_sessions)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_cached_blocks < 1:
            raise ValueError(f"max_cached_blocks must be >= 1, got {max_cached_blocks}")
        self._n_shoppers = int(n_shoppers)
        self._n_items = int(n_items)
        self.n_categories = int(n_categories)
        self.mean_sessions = float(mean_sessions)
        self.seed = int(seed)
        self.block_size = int(block_size)
        self.max_cached_blocks = int(max_cached_blocks)
        self._catalogue = _make_catalogue(np.random.default_rng(self.seed), self._n_items, self.n_categories)
        self._item_dtype = np.int32 if self._n_items <= np.iinfo(np.int32).max else np.int64
        self._cache: OrderedDict[int, _BlockSplit] = OrderedDict()
        self._counts: np.ndarray | None = None
        self.blocks_generated = 0  # how many times a block was generated (cache misses and block() calls)

    def __repr__(self) -> str:
        return (
            f"LazyShop(n_shoppers={self._n_shoppers}, n_items={self._n_items}, n_categories={self.n_categories}, "
            f"mean_sessions={self.mean_sessions}, seed={self.seed}, block_size={self.block_size})"
        )

    @property
    def n_users(self) -> int:
        return self._n_shoppers

    @property
    def n_items(self) -> int:
        return self._n_items

    @property
    def n_blocks(self) -> int:
        return -(-self._n_shoppers // self.block_size)

    @property
    def popularity(self) -> np.ndarray:
        """float64 [n_items]: each item's Zipf view share (``generate_shop``'s catalogue popularity)."""
        return self._catalogue.weight.copy()

    @property
    def item_category(self) -> np.ndarray:
        """int64 [n_items]: each item's category index."""
        return self._catalogue.category.copy()

    # -- generation ----------------------------------------------------------------------------

    def block(self, b: int) -> ShopperBlock:
        """The events of shoppers ``[b * block_size, (b + 1) * block_size)`` (generated afresh, not cached)."""
        b = self._check_block(b)
        start = b * self.block_size
        stop = min(start + self.block_size, self._n_shoppers)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(b,)))
        events, stage = _shopper_events(rng, self._catalogue, self.block_size, self.mean_sessions)
        self.blocks_generated += 1
        cut = int(np.searchsorted(events.shopper, stop - start))  # rows are sorted by shopper
        return ShopperBlock(
            start=start,
            stop=stop,
            shopper=events.shopper[:cut] + start,
            item=events.item[:cut],
            time=events.time[:cut],
            stage=stage[:cut],
            n_shoppers=self._n_shoppers,
            n_items=self._n_items,
        )

    def _split(self, b: int) -> _BlockSplit:
        """Leave-last-out of block ``b``, through the LRU cache."""
        hit = self._cache.get(b)
        if hit is not None:
            self._cache.move_to_end(b)
            return hit
        split = self._make_split(self.block(b))
        self._cache[b] = split
        while len(self._cache) > self.max_cached_blocks:
            self._cache.popitem(last=False)
        return split

    def _make_split(self, block: ShopperBlock) -> _BlockSplit:
        n = block.stop - block.start
        shopper = block.shopper - block.start
        # the last row of each shopper holds out its item (rows are in the frame's order)
        is_last = np.ones(len(shopper), dtype=bool)
        is_last[:-1] = shopper[1:] != shopper[:-1]
        last = np.full(n, NO_TEST_ITEM, dtype=np.int64)
        last[shopper[is_last]] = block.item[is_last]
        test = np.where(distinct_counts(shopper, block.item, n, self._n_items) >= 2, last, NO_TEST_ITEM)
        keep = block.item != test[shopper]
        train = UserItems.from_pairs(shopper[keep], block.item[keep], n, self._n_items)
        return _BlockSplit(indptr=train.indptr, items=train.items.astype(self._item_dtype), test=test)

    # -- the client-data API -------------------------------------------------------------------

    def train_test(self, clients: np.ndarray) -> tuple[UserItems, np.ndarray]:
        """Train positives (one CSR row per entry of ``clients``, in order) and held-out items.

        Generates only the blocks the clients fall in, each at most once per call (in ascending
        order, through the LRU cache). ``clients`` are global shopper indices; repeats are allowed.
        """
        clients = self._check_clients(clients)
        k = len(clients)
        lengths = np.zeros(k, dtype=np.int64)
        test = np.full(k, NO_TEST_ITEM, dtype=np.int64)
        pieces: list[tuple[np.ndarray, np.ndarray]] = []
        blocks = clients // self.block_size
        order = np.argsort(blocks, kind="stable")
        sorted_blocks = blocks[order]
        bounds = np.flatnonzero(np.diff(sorted_blocks)) + 1
        for positions in np.split(order, bounds) if k else []:
            b = int(blocks[positions[0]])
            split = self._split(b)
            local = clients[positions] - b * self.block_size
            first = split.indptr[local]
            lengths[positions] = split.indptr[local + 1] - first
            test[positions] = split.test[local]
            pieces.append((positions, split.items[ranges(first, lengths[positions])]))
        indptr = np.zeros(k + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = np.empty(int(indptr[-1]), dtype=np.int64)
        for positions, values in pieces:
            items[ranges(indptr[positions], lengths[positions])] = values
        return UserItems(indptr=indptr, items=items, n_users=k, n_items=self._n_items), test

    def round_data(self, clients: np.ndarray) -> RoundData:
        """One round's data: call once per round with its sampled clients (unique global indices)."""
        clients = self._check_clients(clients)
        if len(np.unique(clients)) != len(clients):
            raise ValueError("round_data needs unique clients (a round samples each shopper at most once)")
        train, test = self.train_test(clients)
        return RoundData(clients=clients, train=train, test_items=test)

    def counts(self) -> np.ndarray:
        """int32 [n_users]: distinct train items per shopper; the first call streams every block once."""
        if self._counts is None:
            counts = np.empty(self._n_shoppers, dtype=np.int32)
            for b in range(self.n_blocks):
                start = b * self.block_size
                split = self._split(b)
                counts[start : start + len(split.test)] = np.diff(split.indptr)
            self._counts = counts
        return self._counts

    def of(self, client: int) -> np.ndarray:
        """One shopper's train positives through the block cache (see the module docstring)."""
        client = self._check_client(client)
        b, local = divmod(client, self.block_size)
        split = self._split(b)
        return split.items[split.indptr[local] : split.indptr[local + 1]].astype(np.int64)

    def test_item(self, client: int) -> int:
        """One shopper's held-out item (NO_TEST_ITEM if none), through the block cache."""
        client = self._check_client(client)
        b, local = divmod(client, self.block_size)
        return int(self._split(b).test[local])

    # -- checks --------------------------------------------------------------------------------

    def _check_block(self, b: int) -> int:
        if not 0 <= int(b) < self.n_blocks:
            raise IndexError(f"block {b} out of range 0..{self.n_blocks - 1}")
        return int(b)

    def _check_client(self, client: int) -> int:
        if not 0 <= int(client) < self._n_shoppers:
            raise IndexError(f"shopper {client} out of range 0..{self._n_shoppers - 1}")
        return int(client)

    def _check_clients(self, clients: np.ndarray) -> np.ndarray:
        array = np.asarray(clients)
        if array.ndim != 1:
            raise ValueError(f"clients must be one-dimensional, got shape {array.shape}")
        if len(array) and not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"clients must be integer shopper indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
        bad = (array < 0) | (array >= self._n_shoppers)
        if bad.any():
            raise IndexError(f"shopper {int(array[bad][0])} out of range 0..{self._n_shoppers - 1}")
        return array


__all__ = ["LazyShop", "RoundData", "ShopperBlock", "DEFAULT_BLOCK_SIZE"]
