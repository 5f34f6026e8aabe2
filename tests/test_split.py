"""Leave-last-out split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedml.data.ids import IdMap
from fedml.data.movielens import load_movielens_100k
from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER
from fedml.data.split import NO_TEST_ITEM, distinct_counts, leave_last_out
from fedml.data.synthetic import generate_shop

DATA_DIR = Path(os.environ.get("FEDML_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
ML100K = DATA_DIR / "ml-100k"


def _frame(rows: list[tuple[str, str, str, float, int]]) -> pd.DataFrame:
    users, items, events, ratings, times = zip(*rows)
    return pd.DataFrame(
        {
            USER: pd.array(users, dtype="str"),
            ITEM: pd.array(items, dtype="str"),
            EVENT: pd.array(events, dtype="str"),
            RATING: np.array(ratings, dtype=np.float64),
            TIMESTAMP: np.array(times, dtype=np.int64),
        }
    )


NAN = float("nan")
ROWS = [
    ("amy", "x", "view", NAN, 1),
    ("amy", "y", "view", NAN, 2),
    ("amy", "z", "cart", NAN, 3),
    ("amy", "x", "purchase", NAN, 5),  # x again, last: held out, and its earlier view leaves train too
    ("bob", "y", "view", NAN, 7),
    ("bob", "y", "cart", NAN, 8),  # one distinct item: nothing held out
    ("cat", "z", "view", NAN, 9),
    ("cat", "x", "view", NAN, 9),  # same second as z: the later row wins
]


def test_held_out_item_is_the_last_and_leaves_train():
    df = _frame(ROWS)
    ids = IdMap.from_frame(df)
    split = leave_last_out(df, ids)
    amy, bob, cat = ids.user_index(["amy", "bob", "cat"])
    assert ids.item_ids(split.test_items[[amy, cat]]) == ["x", "x"]
    assert split.test_items[bob] == NO_TEST_ITEM
    assert ids.item_ids(split.train.of(amy)) == ["y", "z"]
    assert ids.item_ids(split.train.of(bob)) == ["y"]
    assert ids.item_ids(split.train.of(cat)) == ["z"]
    assert split.test_items.dtype == np.int64 and split.test_items.shape == (3,)
    np.testing.assert_array_equal(split.test_users(), [amy, cat])


def test_train_frame_matches_train():
    df = _frame(ROWS)
    ids = IdMap.from_frame(df)
    split = leave_last_out(df, ids)
    assert list(split.train_frame.columns) == list(df.columns)
    assert split.train_frame[[USER, ITEM]].values.tolist() == [
        ["amy", "y"], ["amy", "z"], ["bob", "y"], ["bob", "y"], ["cat", "z"],
    ]  # fmt: skip
    pairs = split.train_frame.drop_duplicates([USER, ITEM])
    assert len(pairs) == split.train.nnz


def test_timestamp_ties_go_to_the_later_row():
    df = _frame(ROWS)
    swapped = df.iloc[[0, 1, 2, 3, 4, 5, 7, 6]]  # cat's two same-second rows swapped
    ids = IdMap.from_frame(df)
    cat = ids.user_index(["cat"])[0]
    assert ids.item_ids([leave_last_out(swapped, ids).test_items[cat]]) == ["z"]


def test_min_rating_drops_low_ratings():
    df = _frame(
        [
            ("dan", "a", "rating", 5.0, 1),
            ("dan", "b", "rating", 4.0, 2),
            ("dan", "c", "rating", 1.0, 3),  # last, but not a positive
            ("eve", "a", "rating", 2.0, 1),
            ("eve", "b", "rating", 1.0, 2),
        ]
    )
    ids = IdMap.from_frame(df)
    split = leave_last_out(df, ids, min_rating=3.0)
    dan, eve = ids.user_index(["dan", "eve"])
    assert ids.item_ids([split.test_items[dan]]) == ["b"]
    assert ids.item_ids(split.train.of(dan)) == ["a"]
    assert split.test_items[eve] == NO_TEST_ITEM and split.train.counts()[eve] == 0
    assert split.train_frame[ITEM].tolist() == ["a"]
    assert ids.item_ids([leave_last_out(df, ids).test_items[dan]]) == ["c"]  # without min_rating


def test_distinct_counts():
    np.testing.assert_array_equal(distinct_counts(np.array([0, 0, 2, 0]), np.array([1, 1, 3, 2]), 4, 5), [2, 0, 1, 0])


def test_synthetic_split_every_shopper_has_a_test_item():
    df = generate_shop(2000, 300, 8, seed=11).interactions
    ids = IdMap.from_frame(df)
    split = leave_last_out(df, ids)
    assert (split.test_items >= 0).all()
    users = ids.user_index(df[USER])
    last = df.assign(u=users).groupby("u")[ITEM].last()  # frame is time-sorted per shopper
    np.testing.assert_array_equal(split.test_items, ids.item_index(last.sort_index()))
    assert not (split.train.items == split.test_items[split.train.users()]).any()
    held_rows = ids.item_index(df[ITEM]) == split.test_items[users]
    assert len(split.train_frame) == (~held_rows).sum()


@pytest.mark.realdata
@pytest.mark.skipif(not ML100K.exists(), reason=f"{ML100K} not found (set FEDML_DATA_DIR)")
def test_movielens_split():
    df = load_movielens_100k(ML100K)
    ids = IdMap.from_frame(df)
    split = leave_last_out(df, ids)
    assert ids.n_users == 943 and (split.test_items >= 0).all()
    assert split.train.nnz == 100_000 - 943 == len(split.train_frame)  # no repeated (user, movie) pairs
    last_time = df.groupby(USER)[TIMESTAMP].max()
    held = df[ITEM].to_numpy() == np.asarray(ids.item_ids(split.test_items[ids.user_index(df[USER])]))
    np.testing.assert_array_equal(df[held].set_index(USER)[TIMESTAMP].sort_index(), last_time.sort_index())
