"""Ragged rows behave as the list of arrays they replace."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedml.data.ragged import Ragged

rows_strategy = st.lists(st.lists(st.integers(-1000, 1000), max_size=6), max_size=8)


@given(rows_strategy, st.integers(-10, 10), st.integers(-10, 10))
def test_ragged_reads_like_the_list(rows, lo, hi):
    arrays = [np.array(r, dtype=np.int64) for r in rows]
    ragged = Ragged.of(arrays)
    assert len(ragged) == len(arrays) and ragged.sizes.tolist() == [len(r) for r in rows]
    assert [r.tolist() for r in ragged] == rows
    assert [r.tolist() for r in ragged[lo:hi]] == rows[lo:hi]
    assert [r.tolist() for r in ragged[::-2]] == rows[::-2]
    if rows:
        assert ragged[-1].tolist() == rows[-1]
        order = np.arange(len(rows))[::-1]
        assert [r.tolist() for r in ragged.take(order)] == [rows[i] for i in order]
    assert Ragged.of(ragged) is ragged


def test_rows_of_compressed_sparse_rows_and_bad_input():
    indptr, values = np.array([0, 2, 2, 5]), np.array([1, 2, 3, 4, 5])
    picked = Ragged.from_csr(values, indptr, np.array([2, 0, 1]))
    assert [r.tolist() for r in picked] == [[3, 4, 5], [1, 2], []]
    with pytest.raises(IndexError):
        picked[3]
    with pytest.raises(ValueError, match="offsets"):
        Ragged(np.arange(3), np.array([0, 2]))
