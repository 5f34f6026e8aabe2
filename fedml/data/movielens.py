"""MovieLens 100K (``u.data``: ``user TAB item TAB rating TAB timestamp``) as a canonical frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedml.data.errors import DataSourceError
from fedml.data.schema import EVENT, ITEM, MAX_ABS_SECONDS, RATING, TIMESTAMP, USER

DATA_FILE = "u.data"
_FIELDS = 4


def load_movielens_100k(path: str | Path) -> pd.DataFrame:
    """Read ``u.data`` (``path`` is the file or its folder); ids stay strings, event is "rating".

    Raises FileNotFoundError when the file is missing and :class:`DataSourceError` (a ValueError)
    naming the file, line and field when a line does not have four tab-separated fields, a rating
    is not a number or a timestamp is not a whole number of seconds within +-1e15 (an int64 cast
    of anything larger, or of inf, would be silently wrong). An out-of-range rating (inf, 7) is
    read as it is: validation quarantines that row.
    """
    file = _data_file(Path(path))
    users, items, ratings, timestamps = (np.array(col, dtype=object) for col in zip(*_split_lines(file)))
    return pd.DataFrame(
        {
            USER: pd.array(users, dtype="str"),
            ITEM: pd.array(items, dtype="str"),
            EVENT: pd.array(np.full(len(users), "rating"), dtype="str"),
            RATING: _numbers(ratings, file, "rating", np.float64),
            TIMESTAMP: _numbers(timestamps, file, "timestamp", np.int64),
        }
    )


def _data_file(path: Path) -> Path:
    file = path / DATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"MovieLens ratings file not found: {file}")
    return file


def _split_lines(file: Path) -> list[list[str]]:
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataSourceError(f"{file}: line {line}: not UTF-8 text") from exc
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline
    if not lines:
        raise DataSourceError(f"{file}: no ratings (empty file)")
    rows = [line.rstrip("\r").split("\t") for line in lines]
    bad = next((n for n, row in enumerate(rows, start=1) if len(row) != _FIELDS), None)
    if bad is not None:
        raise DataSourceError(f"{file}: line {bad}: expected {_FIELDS} tab-separated fields, got {len(rows[bad - 1])}")
    return rows


def _numbers(values: np.ndarray, file: Path, name: str, dtype: type) -> np.ndarray:
    parsed = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)
    invalid = np.isnan(parsed)
    if dtype is np.int64:
        with np.errstate(invalid="ignore"):
            invalid |= ~(np.abs(parsed) <= MAX_ABS_SECONDS) | (parsed != np.round(parsed))
    if invalid.any():
        line = int(np.flatnonzero(invalid)[0]) + 1
        raise DataSourceError(f"{file}: line {line}: {name} {values[line - 1]!r} is not a valid number")
    return parsed.astype(dtype)


__all__ = ["load_movielens_100k", "DATA_FILE"]
