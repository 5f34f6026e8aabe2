"""Tmall 2014 brand log (``t_alibaba_data.csv``: ``user_id,brand_id,type,visit_datetime``) as a canonical frame.

Brands are the items. ``type`` 0/1/2/3 is click/purchase/favourite/add-to-cart, read as the
funnel events view/purchase/favourite/cart. ``visit_datetime`` is ``M-D`` without a year: it is
read as midnight UTC of that day in :data:`YEAR`, so timestamps have one-day resolution and rows of
one day keep the file's order (the split's tie rule: the later row wins).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedml.data.errors import DataSourceError
from fedml.data.events import read_csv_text
from fedml.data.schema import EVENT, ITEM, RATING, TIMESTAMP, USER

DATA_FILE = "t_alibaba_data.csv"
YEAR = 2014
EVENTS = {"0": "view", "1": "purchase", "2": "favourite", "3": "cart"}
_COLUMNS = ["user_id", "brand_id", "type", "visit_datetime"]


def load_tmall(path: str | Path) -> pd.DataFrame:
    """Read the log (``path`` is the file or its folder); ids stay strings, ``rating`` is NaN.

    Raises FileNotFoundError when the file is missing and :class:`DataSourceError` (a ValueError)
    naming the file and line when it is not UTF-8 CSV text, the header differs, a row is longer than
    the header, a ``type`` is unknown or a date is not ``M-D``.
    """
    path = Path(path)
    file = path / DATA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"Tmall log not found: {file}")
    raw = read_csv_text(file, na_values=())
    if list(raw.columns) != _COLUMNS:
        raise DataSourceError(f"{file}: expected header {','.join(_COLUMNS)}, got {','.join(raw.columns)}")
    events = raw["type"].map(EVENTS)
    _fail_at(file, events.isna().to_numpy(), "type", raw["type"])
    dates = pd.to_datetime(f"{YEAR}-" + raw["visit_datetime"], format="%Y-%m-%d", errors="coerce", utc=True)
    _fail_at(file, dates.isna().to_numpy(), "visit_datetime", raw["visit_datetime"])
    return pd.DataFrame(
        {
            USER: pd.array(raw["user_id"], dtype="str"),
            ITEM: pd.array(raw["brand_id"], dtype="str"),
            EVENT: pd.array(events, dtype="str"),
            RATING: np.full(len(raw), np.nan),
            TIMESTAMP: (dates - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1),
        }
    )


def _fail_at(file: Path, bad: np.ndarray, column: str, values: pd.Series) -> None:
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataSourceError(f"{file}: line {row + 2}: {column} {values.iloc[row]!r} is not valid")


__all__ = ["load_tmall", "DATA_FILE", "EVENTS", "YEAR"]
