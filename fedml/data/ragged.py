"""Many small integer arrays in one: a round's clients' positives without one numpy object per client.

:class:`Ragged` is a sequence of int64 arrays (row ``i`` is ``flat[offsets[i]:offsets[i + 1]]``), so
code written for a list of arrays reads it unchanged, while vectorised code uses ``flat`` and
``sizes`` directly. At thousands of clients per round, per-client Python objects cost more than the
round's arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import overload

import numpy as np


class Ragged(Sequence[np.ndarray]):
    """Rows of int64 values, stored back to back."""

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        self.flat = np.asarray(flat, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if (
            self.offsets.ndim != 1
            or len(self.offsets) == 0
            or self.offsets[0] != 0
            or self.offsets[-1] != len(self.flat)
        ):
            raise ValueError("offsets must start at 0 and end at len(flat)")

    @classmethod
    def of(cls, rows: Sequence[np.ndarray]) -> Ragged:
        """From any sequence of 1-d integer arrays (a Ragged is returned as it is)."""
        if isinstance(rows, Ragged):
            return rows
        sizes = np.fromiter((len(row) for row in rows), dtype=np.int64, count=len(rows))
        flat = np.concatenate([np.asarray(row, dtype=np.int64) for row in rows]) if len(rows) else np.zeros(0, np.int64)
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]))

    @classmethod
    def from_csr(cls, values: np.ndarray, indptr: np.ndarray, rows: np.ndarray) -> Ragged:
        """Rows ``rows`` (in that order) of the compressed sparse rows ``(indptr, values)``."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, sizes = indptr[rows], indptr[rows + 1] - indptr[rows]
        return cls(values[ranges(starts, sizes)], np.concatenate([[0], np.cumsum(sizes)]))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> Ragged: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | Ragged:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            stop = max(start, stop)
            lo, hi = self.offsets[start], self.offsets[stop]
            return Ragged(self.flat[lo:hi], self.offsets[start : stop + 1] - lo)
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"row {index} of {n}")
        index %= n
        return self.flat[self.offsets[index] : self.offsets[index + 1]]

    def take(self, rows: np.ndarray | Sequence[int]) -> Ragged:
        """The given rows, in that order."""
        return Ragged.from_csr(self.flat, self.offsets, np.asarray(rows, dtype=np.int64))


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each pair (vectorised)."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) + np.repeat(starts - (ends - lengths), lengths)
