"""A shop's own event log, from CSV (optionally gzipped) or Parquet, read as it is.

This step only reads: CSV cells stay strings (empty cells NaN) and no row is dropped or coerced,
so that validation can coerce the types and quarantine bad rows one by one, and raise a
SchemaError for a missing column. What it completes: a file with ``rating`` but no ``event``
column gets ``event = "rating"``, one with ``event`` but no ``rating`` gets ``rating = NaN``.
A file that cannot be read at all raises :class:`DataSourceError`.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa

from fedml.data.schema import EVENT, RATING

CSV_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"


class DataSourceError(ValueError):
    """A data file cannot be read at all; the message names the file, and the line when known."""


def load_events(path: str | Path) -> pd.DataFrame:
    """Read an event log; columns ``user_id, item_id, timestamp`` and ``event`` and/or ``rating``."""
    path = Path(path)
    is_csv = _is_csv(path)
    if not path.is_file():
        raise FileNotFoundError(f"events file not found: {path}")
    return _complete_event_rating(_read_csv(path) if is_csv else _read_parquet(path))


def _is_csv(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(CSV_SUFFIXES):
        return True
    if name.endswith(PARQUET_SUFFIXES):
        return False
    supported = ", ".join(CSV_SUFFIXES + PARQUET_SUFFIXES)
    raise DataSourceError(f"{path}: unsupported file type; supported: {supported}")


def _open_raw(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_csv(path: Path) -> pd.DataFrame:
    _sniff_csv(path)
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=True, encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: line {_first_non_utf8_line(path)}: not UTF-8 text") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataSourceError(f"{path}: empty file (no header row)") from exc
    except pd.errors.ParserError as exc:  # pandas' message names the line
        raise DataSourceError(f"{path}: not a readable CSV file: {str(exc).strip()}") from exc
    except (OSError, EOFError, zlib.error) as exc:  # a broken gzip stream
        raise DataSourceError(f"{path}: cannot read: {exc}") from exc


def _sniff_csv(path: Path) -> None:
    """Refuse binary content early: NUL bytes or a Parquet header are no CSV text."""
    try:
        with _open_raw(path) as fh:
            head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataSourceError(f"{path}: cannot read: {exc}") from exc
    if head.startswith(_PARQUET_MAGIC):
        raise DataSourceError(f"{path}: a Parquet file, not CSV; name it {PARQUET_SUFFIXES[0]}")
    nul = head.find(b"\x00")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        raise DataSourceError(f"{path}: line {line}: binary data, not CSV text")


def _first_non_utf8_line(path: Path) -> int:
    with _open_raw(path) as fh:
        data = fh.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data.count(b"\n", 0, exc.start) + 1
    return 0  # pragma: no cover - only called after a decode error


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise DataSourceError(f"{path}: not a readable Parquet file: {exc}") from exc


def _complete_event_rating(df: pd.DataFrame) -> pd.DataFrame:
    if RATING in df.columns and EVENT not in df.columns:
        df[EVENT] = pd.Series("rating", index=df.index, dtype="str")
    elif EVENT in df.columns and RATING not in df.columns:
        df[RATING] = np.full(len(df), np.nan)
    return df


__all__ = ["DataSourceError", "load_events", "CSV_SUFFIXES", "PARQUET_SUFFIXES"]
