"""A shop's own event log, from CSV (optionally gzipped) or Parquet, read as it is.

This step only reads: CSV cells stay strings (only empty cells are NaN: "NA" or "null" stay text,
and validation decides what is missing, as it does for Parquet) and no row is dropped or coerced,
so that validation can coerce the types and quarantine bad rows one by one, and raise a
SchemaError for a missing column. A blank line is not a row. What it completes: a file with
``rating`` but no ``event`` column gets ``event = "rating"``, one with ``event`` but no ``rating``
gets ``rating = NaN``.

A file that cannot be read at all raises :class:`DataSourceError` naming the file (and the line
when known): binary content, text that is not UTF-8 (UTF-16 and UTF-32 are named), an empty file, a
repeated column name in the header, or a row with more fields than the header (pandas would
otherwise take the first column as the index and shift every name by one).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa

from fedml.data.errors import DataSourceError
from fedml.data.schema import EVENT, RATING

CSV_SUFFIXES: tuple[str, ...] = (".csv", ".csv.gz")
PARQUET_SUFFIXES: tuple[str, ...] = (".parquet", ".pq")
_SNIFF_BYTES = 64 * 1024
_PARQUET_MAGIC = b"PAR1"
_WIDE_BOMS = {  # longest first: the UTF-32 LE mark starts with the UTF-16 LE one
    codecs.BOM_UTF32_LE: "UTF-32",
    codecs.BOM_UTF32_BE: "UTF-32",
    codecs.BOM_UTF16_LE: "UTF-16",
    codecs.BOM_UTF16_BE: "UTF-16",
}


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
    return read_csv_text(path, na_values=("",))


def read_csv_text(path: Path, na_values: tuple[str, ...]) -> pd.DataFrame:
    """A UTF-8 CSV file (optionally gzipped) as strings; only ``na_values`` cells are NaN.

    Raises :class:`DataSourceError` naming the file (and the line when known) for anything that is
    not such a file, a header that repeats a name, or a row longer than the header.
    """
    _sniff_csv(path)
    kwargs: dict = {"dtype": str, "keep_default_na": False, "na_values": list(na_values), "encoding": "utf-8"}
    try:
        with warnings.catch_warnings():
            # index_col=False: a row longer than the header must not turn the first column into the index;
            # pandas then only warns that it drops the extra fields, and that warning is an error here
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(path, index_col=False, **kwargs)
            header = pd.read_csv(path, header=None, nrows=1, index_col=False, **kwargs).iloc[0].tolist()
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: line {_first_non_utf8_line(path)}: not UTF-8 text") from exc
    except pd.errors.EmptyDataError as exc:
        raise DataSourceError(f"{path}: empty file (no header row)") from exc
    except pd.errors.ParserWarning as exc:
        line, fields, width = _first_long_row(path)
        raise DataSourceError(f"{path}: line {line}: {fields} fields, but the header has {width}") from exc
    except pd.errors.ParserError as exc:  # pandas' message names the line
        raise DataSourceError(f"{path}: not a readable CSV file: {str(exc).strip()}") from exc
    except (OSError, EOFError, zlib.error) as exc:  # a broken gzip stream
        raise DataSourceError(f"{path}: cannot read: {exc}") from exc
    _refuse_repeated_names(path, ["" if pd.isna(name) else str(name) for name in header], "line 1: the header")
    return frame


def _refuse_repeated_names(path: Path, names: list[str], where: str) -> None:
    repeated = sorted({name for name in names if name and names.count(name) > 1})  # blanks: 'Unnamed: n'
    if repeated:
        shown = ", ".join(repr(name) for name in repeated)
        raise DataSourceError(f"{path}: {where} names column(s) {shown} more than once")


def _first_long_row(path: Path) -> tuple[int, int, int]:
    """(line, fields, header fields) of the first row longer than the header, as the csv module reads it."""
    with _open_raw(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text)
        width = len(next(reader, []))
        for row in reader:
            if len(row) > width:
                return reader.line_num, len(row), width
    return 2, width + 1, width  # pragma: no cover - pandas and the csv module disagree on the file


def _sniff_csv(path: Path) -> None:
    """Refuse binary content early: NUL bytes or a Parquet header are no CSV text."""
    try:
        with _open_raw(path) as fh:
            head = fh.read(_SNIFF_BYTES)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataSourceError(f"{path}: cannot read: {exc}") from exc
    if head.startswith(_PARQUET_MAGIC):
        raise DataSourceError(f"{path}: a Parquet file, not CSV; name it {PARQUET_SUFFIXES[0]}")
    wide = next((name for bom, name in _WIDE_BOMS.items() if head.startswith(bom)), None)
    if wide is not None:
        raise DataSourceError(f"{path}: line 1: {wide} text (byte-order mark); save the file as UTF-8")
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
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
        _refuse_repeated_names(path, names, "the Parquet schema")
        return pd.read_parquet(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        if isinstance(exc, DataSourceError):
            raise
        raise DataSourceError(f"{path}: not a readable Parquet file: {exc}") from exc


def _complete_event_rating(df: pd.DataFrame) -> pd.DataFrame:
    if RATING in df.columns and EVENT not in df.columns:
        df[EVENT] = pd.Series("rating", index=df.index, dtype="str")
    elif EVENT in df.columns and RATING not in df.columns:
        df[RATING] = np.full(len(df), np.nan)
    return df


__all__ = ["DataSourceError", "load_events", "read_csv_text", "CSV_SUFFIXES", "PARQUET_SUFFIXES"]
