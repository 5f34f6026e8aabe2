"""Bad input, property-based: the loaders and validation never show a traceback, and never lose a row.

Every reader (events CSV / gzipped CSV / Parquet, MovieLens ``u.data``, the Tmall log) either returns
a frame or raises :class:`DataSourceError` naming the file (and the line when it can); validation
either raises :class:`SchemaError` naming the source and column, or accounts for every row:
``rows in == rows kept + rows quarantined``, each quarantined row with its reason.

Example counts are module constants (reported in docs/reliability.md). Parsing is fuzzed broadly;
Great Expectations runs on fewer examples, as each validation costs about 0.2 s.
"""

from __future__ import annotations

import csv
import gzip
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fedml.data.errors import DataSourceError
from fedml.data.events import load_events
from fedml.data.movielens import load_movielens_100k
from fedml.data.schema import EVENT, ITEM, QUARANTINE_REASON, RATING, REQUIRED_COLUMNS, TIMESTAMP, USER
from fedml.data.tmall import load_tmall
from fedml.data.validation import SOURCE_ROW, SchemaError, coerce_interactions, validate_interactions

ROOT = Path(__file__).resolve().parents[1]
EXPECTATIONS = ROOT / "expectations"
NOW = 1_700_000_000
FLOOR = 631_152_000  # 1990-01-01, the row suite's lower bound on timestamps

#: hypothesis examples per test (docs/reliability.md reports these)
BYTES_EXAMPLES = 150  # per reader
CSV_TEXT_EXAMPLES = 200
MOVIELENS_EXAMPLES = 150
COERCION_EXAMPLES = 100
GX_FRAME_EXAMPLES = 20
GX_FILE_EXAMPLES = 12
GX_AGREEMENT_EXAMPLES = 8

_FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# Great Expectations costs ~0.2 s a call: shrinking a failure would take many minutes, so it reports it unshrunk
_GX = settings(_FAST, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# Cells that have broken readers somewhere: null words, numbers out of every range, dates, quoting, unicode.
ODD_TEXT = [
    "", " ", "NA", "null", "NULL", "None", "nan", "NaN", "#N/A", "<NA>", "inf", "-inf", "1e400", "-1", "0", "3",
    "4.5", "7", "1000000000", "1000000000.7", "99999999999999999999999", "-99999999999999999999", "1e15",
    "2020-01-01T00:00:00Z", "2020-01-01 12:00:00+05:00", "2020-02-30", "yesterday", "\u0661\u0662\u0663", "view",
    "VIEW ", "rating", "cart", "purchase", "favourite", "teleport", "u1", "u2", "i1", "i2", "a,b", 'say "hi"',
    "line\nbreak", "\t", "caf\u00e9", "\U0001f600", "0x10", "1_000", "\\N", "True",
]  # fmt: skip
text_cells = st.one_of(st.sampled_from(ODD_TEXT), st.text(max_size=6))
# A lone carriage return is a line break to every CSV reader, and CSV writers (Python's, pandas') leave it
# unquoted: such a cell makes two rows of one, in any program. The file tests leave it out.
file_cells = text_cells.filter(lambda cell: "\r" not in cell)
typed_cells = st.one_of(
    text_cells,
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.integers(FLOOR, NOW),
    st.booleans(),
    st.datetimes(),
    st.binary(max_size=4),
)
column_names = st.sampled_from([*REQUIRED_COLUMNS, *REQUIRED_COLUMNS, "tag", "channel", "", "User_ID", "user_id "])


def _write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    if name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _readable_or_named_error(read: Callable[[Path], pd.DataFrame], path: Path) -> pd.DataFrame | None:
    """The frame, or None when the reader raised the project's error naming the file; anything else fails."""
    try:
        frame = read(path)
    except DataSourceError as exc:
        assert str(path) in str(exc), exc
        return None
    assert isinstance(frame, pd.DataFrame)
    return frame


def _validate(frame: pd.DataFrame, source: str = "fuzz", **kwargs) -> object:
    return validate_interactions(frame, source=source, expectations_dir=EXPECTATIONS, now=NOW, **kwargs)


def _assert_accounted_for(frame: pd.DataFrame, source: str, min_interactions: int = 1) -> None:
    """Validation raises SchemaError naming the source and column, or keeps + quarantines every row."""
    try:
        result = _validate(frame, source=source, min_interactions=min_interactions)
    except SchemaError as exc:
        assert str(exc).startswith(f"{source}: "), exc
        names = [str(c) for c in frame.columns]
        missing = [c for c in REQUIRED_COLUMNS if c not in names]
        repeated = [c for c in set(names) if names.count(c) > 1]
        assert missing or repeated, f"schema breach without a missing or repeated column: {exc}"
        assert any(c in str(exc) for c in [*missing, *repeated]), exc
        return
    kept, quarantined = result.kept, result.quarantined
    assert len(frame) == len(kept) + len(quarantined)  # nothing lost, nothing invented
    assert result.report["rows_in"] == len(frame)
    assert (result.report["rows_kept"], result.report["rows_quarantined"]) == (len(kept), len(quarantined))
    rows = quarantined[SOURCE_ROW].tolist()
    assert rows == sorted(set(rows)) and all(0 <= r < len(frame) for r in rows)
    assert quarantined[QUARANTINE_REASON].str.len().gt(0).all()
    # what is kept is typed and inside the suite's bounds
    assert kept[TIMESTAMP].dtype == np.int64 and kept[RATING].dtype == np.float64
    assert kept[TIMESTAMP].between(FLOOR, NOW).all()
    assert kept[RATING].isna().all() or kept[RATING].dropna().between(1, 5).all()
    assert kept[[USER, ITEM, EVENT]].notna().all().all() and (kept[USER].str.len() > 0).all()


# ------------------------------------------------------------------------------------------ readers: any bytes

READERS: dict[str, tuple[str, Callable[[Path], pd.DataFrame]]] = {
    "events-csv": ("log.csv", load_events),
    "events-csv-gz": ("log.csv.gz", load_events),
    "events-parquet": ("log.parquet", load_events),
    "movielens": ("u.data", load_movielens_100k),
    "tmall": ("t_alibaba_data.csv", load_tmall),
}
_BYTE_PREFIXES = [b"", b"PAR1", b"\xef\xbb\xbf", b"\xff\xfe", b"user_id,item_id,event,rating,timestamp\n",
                  b"user_id,brand_id,type,visit_datetime\n", b"1\t2\t3\t881250949\n"]  # fmt: skip


@pytest.mark.parametrize("reader", list(READERS))
@settings(_FAST, max_examples=BYTES_EXAMPLES)
@given(prefix=st.sampled_from(_BYTE_PREFIXES), data=st.binary(max_size=600))
def test_any_bytes_give_a_frame_or_an_error_naming_the_file(reader: str, prefix: bytes, data: bytes) -> None:
    name, read = READERS[reader]
    with tempfile.TemporaryDirectory() as tmp:
        _readable_or_named_error(read, _write(Path(tmp), name, prefix + data))


# ------------------------------------------------------------------------------------------ events CSV: text


@st.composite
def csv_files(draw: st.DrawFn) -> tuple[bytes, list[str], list[list[str]], str]:
    """(file bytes, header, data rows, encoding); now and then a row has one field more than the header."""
    header = draw(st.lists(column_names, min_size=2, max_size=7))
    rows = []
    for _ in range(draw(st.integers(0, 12))):
        width = draw(st.integers(2, len(header))) if draw(st.booleans()) else len(header)
        if draw(st.integers(0, 20)) == 0:
            width = len(header) + 1  # one field too many (e.g. a trailing comma)
        rows.append([draw(file_cells) for _ in range(width)])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    writer.writerows(rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16", "utf-32"]))
    return buffer.getvalue().encode(encoding, errors="replace"), header, rows, encoding


@settings(_FAST, max_examples=CSV_TEXT_EXAMPLES)
@given(spec=csv_files(), gz=st.booleans())
def test_csv_text_every_data_row_is_read_or_the_error_names_file_and_line(spec, gz: bool) -> None:
    data, header, rows, encoding = spec
    long_rows = [row for row in rows if len(row) > len(header)]
    named = [h for h in header if h]
    repeated = len(set(named)) < len(named)
    try:
        data.decode("utf-8")
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "log.csv.gz" if gz else "log.csv", data)
        try:
            frame = load_events(path)
        except DataSourceError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: ") and "line " in message, message
            if encoding in ("utf-16", "utf-32"):
                assert message.endswith(f"{encoding.upper()} text (byte-order mark); save the file as UTF-8")
            elif "not UTF-8 text" in message:
                assert not utf8
            elif "more than once" in message:
                assert repeated
            elif "binary data" in message:
                assert b"\x00" in data  # a NUL character is refused as binary
            else:  # pandas' "Expected 3 fields in line 4, saw 4", or ours
                assert long_rows, message
            return
    assert utf8 and encoding not in ("utf-16", "utf-32") and not repeated
    assert len(frame) == len(rows)  # a row of blank cells is still a row (only a blank line is not)
    assert all(row[-1] == "" for row in long_rows)  # only an empty trailing field may be dropped
    completed = {EVENT: RATING, RATING: EVENT}  # the loader adds the missing one of the two
    added = [completed[c] for c in (EVENT, RATING) if c in named and completed[c] not in named]
    assert [c for c in frame.columns if not str(c).startswith("Unnamed: ")] == named + added


def test_csv_row_longer_than_the_header_is_an_error_not_shifted_columns(tmp_path: Path) -> None:
    """Regression: rows with one field more than the header made pandas use user_id as the index, and
    every column took its neighbour's values. A trailing comma (an empty last field) is tolerated."""
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,event,timestamp\nu1,i1,view,1000000000,x\nu2,i2,view,1000000001,y\n")
    with pytest.raises(DataSourceError, match=r"log\.csv: line 2: 5 fields, but the header has 4"):
        load_events(path)
    path.write_text("user_id,item_id,event,timestamp\nu1,i1,view,1000000000,\nu2,i2,view,1000000001,\n")
    frame = load_events(path)
    assert frame[USER].tolist() == ["u1", "u2"] and frame[TIMESTAMP].tolist() == ["1000000000", "1000000001"]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_repeated_column_names_are_refused(tmp_path: Path, suffix: str) -> None:
    """Regression: pandas renamed a second ``user_id`` to ``user_id.1`` and the file was read."""
    path = tmp_path / f"log.{suffix}"
    if suffix == "csv":
        path.write_text("user_id,item_id,user_id,event,timestamp\nu1,i1,u9,view,1000000000\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table([["u1"], ["i1"], ["u9"]], names=["user_id", "item_id", "user_id"]), path)
    with pytest.raises(DataSourceError, match=r"names column\(s\) 'user_id' more than once") as info:
        load_events(path)
    assert str(path) in str(info.value)
    frame = pd.DataFrame(
        [["u1", "i1", "u9", "view", np.nan, 1e9]], columns=["user_id", "item_id", "user_id", *REQUIRED_COLUMNS[2:]]
    )
    with pytest.raises(SchemaError, match="fuzz: column.s. user_id appear more than once"):
        _validate(frame)


@pytest.mark.parametrize(
    ("encoding", "name"), [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-32", "UTF-32"), ("utf-32-be", "UTF-32")]
)
def test_wide_unicode_is_named(tmp_path: Path, encoding: str, name: str) -> None:
    """Regression: UTF-16 and UTF-32 files (as Excel and PowerShell write them) were called "binary data"."""
    path = tmp_path / "log.csv"
    path.write_bytes("\ufeffuser_id,item_id,event,timestamp\nu1,i1,view,1000000000\n".encode(encoding))
    with pytest.raises(
        DataSourceError, match=rf"log\.csv: line 1: {name} text \(byte-order mark\); save the file as UTF-8"
    ):
        load_events(path)


def test_utf8_with_bom_reads_like_utf8(tmp_path: Path) -> None:
    text = "user_id,item_id,event,timestamp\nu1,i1,view,1000000000\n"
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "plain.csv").write_text(text)
    pd.testing.assert_frame_equal(load_events(tmp_path / "bom.csv"), load_events(tmp_path / "plain.csv"))


def test_huge_and_empty_files(tmp_path: Path) -> None:
    n = 60_000
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            USER: [f"u{i}" for i in rng.integers(0, 5000, n)],
            ITEM: [f"i{i}" for i in rng.integers(0, 900, n)],
            EVENT: "view",
            TIMESTAMP: rng.integers(1_000_000_000, NOW, n),
        }
    )
    frame.loc[::1000, ITEM] = "x" * 20_000  # sixty huge cells too
    frame.to_csv(tmp_path / "huge.csv", index=False)
    loaded = load_events(tmp_path / "huge.csv")
    assert len(loaded) == n and (loaded[ITEM].str.len() == 20_000).sum() == n // 1000
    for text in ("", "\n", "\n\n  \n"):
        (tmp_path / "empty.csv").write_text(text)
        with pytest.raises(DataSourceError, match=r"empty\.csv: empty file"):
            load_events(tmp_path / "empty.csv")
    (tmp_path / "header-only.csv").write_text(",".join(REQUIRED_COLUMNS) + "\n")
    result = _validate(load_events(tmp_path / "header-only.csv"))
    assert (result.report["rows_in"], result.report["rows_kept"], result.report["rows_quarantined"]) == (0, 0, 0)


# ------------------------------------------------------------------------------------------ MovieLens and Tmall


@settings(_FAST, max_examples=MOVIELENS_EXAMPLES)
@given(rows=st.lists(st.lists(text_cells, min_size=3, max_size=5), min_size=1, max_size=8))
def test_movielens_fields_read_or_named(rows: list[list[str]]) -> None:
    text = "".join("\t".join(cell.replace("\n", " ") for cell in row) + "\n" for row in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), "u.data", text.encode())
        frame = _readable_or_named_error(load_movielens_100k, path)
    if frame is None:
        return
    assert len(frame) == len(rows) and frame[TIMESTAMP].dtype == np.int64
    assert frame[TIMESTAMP].abs().max() <= 1e15  # never an int64 wrapped from inf or 1e30


@pytest.mark.parametrize("value", ["inf", "-inf", "1e30", "9223372036854775807", "1e15.5", "NaN"])
def test_movielens_timestamps_that_int64_cannot_hold_are_named(tmp_path: Path, value: str) -> None:
    """Regression: inf and 1e30 were cast to int64 garbage (-9223372036854775808) and read as times."""
    (tmp_path / "u.data").write_text(f"1\t2\t3\t881250949\n1\t3\t4\t{value}\n")
    with pytest.raises(DataSourceError, match=rf"u\.data: line 2: timestamp '{value}'"):
        load_movielens_100k(tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "empty file"),
        ("user_id,brand_id,type,visit_datetime\n1,caf\xe9,0,4-15\n".encode("latin-1"), "line 2: not UTF-8"),
        (b"\x00\x01\xff", "line 1: binary data"),
        (b"user_id,brand_id,type,visit_datetime\n1,2,0,4-15,x\n", "line 2: 5 fields, but the header has 4"),
    ],
)
def test_tmall_unreadable_files_are_named(tmp_path: Path, data: bytes, match: str) -> None:
    """Regression: these raised pandas' EmptyDataError / UnicodeDecodeError, or read the wrong columns."""
    path = _write(tmp_path, "t_alibaba_data.csv", data)
    with pytest.raises(DataSourceError, match=match) as info:
        load_tmall(path)
    assert str(path) in str(info.value)


# ------------------------------------------------------------------------------------------ validation


@st.composite
def odd_frames(draw: st.DrawFn, cells: st.SearchStrategy = typed_cells) -> pd.DataFrame:
    """Frames of 0..12 rows over required and extra columns; each column object-typed or numeric."""
    names = draw(st.lists(column_names, min_size=1, max_size=7))
    n = draw(st.integers(0, 12))
    data = {}
    for i in range(len(names)):
        kind = draw(st.sampled_from(["cells", "cells", "float", "int", "datetime"]))
        if kind == "float":
            values = pd.Series(draw(st.lists(st.floats(), min_size=n, max_size=n)), dtype="float64")
        elif kind == "int":
            values = pd.Series(draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n)), dtype="int64")
        elif kind == "datetime":
            values = pd.Series(draw(st.lists(st.datetimes(), min_size=n, max_size=n)), dtype="datetime64[us]")
        else:
            values = pd.Series(draw(st.lists(cells, min_size=n, max_size=n)), dtype=object)
        data[i] = values
    frame = pd.DataFrame(data)
    frame.columns = names
    return frame


@settings(_FAST, max_examples=COERCION_EXAMPLES)
@given(frame=odd_frames())
def test_coercion_types_every_cell_or_reports_it(frame: pd.DataFrame) -> None:
    if frame.columns.duplicated().any():
        return  # validation refuses these before coercion (test_repeated_column_names_are_refused)
    typed, errors = coerce_interactions(frame)
    assert set(errors) <= set(range(len(frame)))
    for column in typed.columns:
        if column in (USER, ITEM, EVENT):
            assert all(isinstance(v, str) and v == v.strip() and v for v in typed[column].dropna())
    if RATING in typed:
        assert typed[RATING].dtype == np.float64
    if TIMESTAMP in typed:
        assert str(typed[TIMESTAMP].dtype) == "Int64"
        assert typed[TIMESTAMP].dropna().abs().max() <= 1e15 if typed[TIMESTAMP].notna().any() else True


@settings(_GX, max_examples=GX_FRAME_EXAMPLES)
@given(frame=odd_frames(), min_interactions=st.sampled_from([1, 2]))
def test_validation_accounts_for_every_row_of_odd_frames(frame: pd.DataFrame, min_interactions: int) -> None:
    _assert_accounted_for(frame, "odd-frame", min_interactions)


@st.composite
def event_logs(draw: st.DrawFn) -> pd.DataFrame:
    """All five columns (+ a tag), mostly plausible cells with odd ones mixed in, as strings."""
    n = draw(st.integers(1, 12))
    plausible = {
        USER: st.sampled_from(["u1", "u2", "u3"]),
        ITEM: st.sampled_from(["i1", "i2", "i3", "i4"]),
        EVENT: st.sampled_from(["view", "cart", "purchase", "rating"]),
        RATING: st.sampled_from(["", "1", "4", "5"]),
        TIMESTAMP: st.integers(FLOOR, NOW).map(str),
    }
    # a NUL character makes the CSV file binary (refused: test_csv_text_...), while Parquet takes it
    odd = file_cells.filter(lambda cell: "\x00" not in cell)
    columns = {"tag": [f"t{i}" for i in range(n)]}
    for column, good in plausible.items():
        columns[column] = draw(st.lists(st.one_of(good, good, good, odd), min_size=n, max_size=n))
    return pd.DataFrame(columns, dtype=object)


@settings(_GX, max_examples=GX_FILE_EXAMPLES)
@given(log=event_logs(), suffix=st.sampled_from(["csv", "csv.gz", "parquet"]))
def test_files_through_validation_lose_no_row(log: pd.DataFrame, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"log.{suffix}"
        log.to_parquet(path, index=False) if suffix == "parquet" else log.to_csv(path, index=False)
        frame = load_events(path)
    assert len(frame) == len(log)
    _assert_accounted_for(frame, path.name)


@settings(_GX, max_examples=GX_AGREEMENT_EXAMPLES)
@given(log=event_logs())
def test_csv_and_parquet_of_the_same_text_validate_alike(log: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        log.to_csv(Path(tmp) / "log.csv", index=False)
        log.to_parquet(Path(tmp) / "log.parquet", index=False)
        from_csv, from_parquet = (_validate(load_events(Path(tmp) / f"log.{s}")) for s in ("csv", "parquet"))
    assert from_csv.kept["tag"].tolist() == from_parquet.kept["tag"].tolist()
    assert from_csv.quarantined[SOURCE_ROW].tolist() == from_parquet.quarantined[SOURCE_ROW].tolist()
    assert from_csv.quarantined[QUARANTINE_REASON].tolist() == from_parquet.quarantined[QUARANTINE_REASON].tolist()


def test_null_words_are_missing_in_csv_and_parquet_alike(tmp_path: Path) -> None:
    """Regression: CSV read "NA"/"None" ids as missing (pandas' defaults) while Parquet kept them as ids."""
    log = pd.DataFrame(
        {
            "tag": ["t0", "t1", "t2", "t3"],
            USER: ["u1", "NA", "u1", "NULL"],
            ITEM: ["i1", "i2", "None", "i4"],
            EVENT: ["view"] * 4,
            RATING: [""] * 4,
            TIMESTAMP: ["1000000000"] * 4,
        }
    )
    log.to_csv(tmp_path / "log.csv", index=False)
    log.to_parquet(tmp_path / "log.parquet", index=False)
    for name in ("log.csv", "log.parquet"):
        result = _validate(load_events(tmp_path / name), min_interactions=1)
        assert result.kept["tag"].tolist() == ["t0"], name
        assert result.quarantined[SOURCE_ROW].tolist() == [1, 2, 3], name
