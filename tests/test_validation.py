"""Data validation with real Great Expectations suites (no mocks)."""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package is not necessarily installed into the venv
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

from fedml.data.schema import QUARANTINE_REASON, REQUIRED_COLUMNS  # noqa: E402
from fedml.data.validation import (  # noqa: E402
    SOURCE_ROW,
    SchemaError,
    ValidationResult,
    validate_interactions,
    write_quarantine,
    write_report,
)

EXPECTATIONS = ROOT / "expectations"
NOW = 1_700_000_000

NOT_NULL_USER = "expect_column_values_to_not_be_null(user_id)"
IN_SET_EVENT = "expect_column_values_to_be_in_set(event)"
RATING_RANGE = "expect_column_values_to_be_between(rating)"
RATING_PRESENT = 'expect_column_values_to_not_be_null(rating where event=="rating")'
TIME_RANGE = "expect_column_values_to_be_between(timestamp)"
TIME_PRESENT = "expect_column_values_to_not_be_null(timestamp)"
UNIQUE = "expect_compound_columns_to_be_unique(user_id,item_id,event,timestamp)"
MIN_INTERACTIONS = "expect_column_values_to_be_between(user_interactions)"

# tag, user_id, item_id, event, rating, timestamp
EVENTS_CSV = f"""tag,user_id,item_id,event,rating,timestamp
r0,u1,i1,view,,1000000000
r1, u1 ,i2,CART ,,2020-01-01T00:00:00Z
r2,u1,i3,rating,4,1000000002
r3,,i1,view,,1000000003
r4,u2,i1,teleport,,1000000004
r5,u2,i2,rating,7,1000000005
r6,u2,i3,view,,{NOW + 3600}
r7,u2,i4,rating,abc,1000000007
r8,u1,i1,view,,1000000000
r9,u3,i1,view,,1000000009
r10,u3,i2,purchase,,1000000010
r11,u3,i3,favourite,,1000000011
r12,u2,i5,view,,1000000012
r13,u2,i6,view,,1000000013
r14,u2,i7,rating,5,1000000014
r15,lonely,i1,view,,1000000015
r16,lonely,i2,purchase,,1000000016
r17,u3,i4,view,,yesterday
"""

EXPECTED_REASONS = {
    3: NOT_NULL_USER,
    4: IN_SET_EVENT,
    5: RATING_RANGE,
    6: TIME_RANGE,
    7: f"type: rating value 'abc' is not a number; {RATING_PRESENT}",
    8: UNIQUE,
    15: MIN_INTERACTIONS,
    16: MIN_INTERACTIONS,
    17: f"type: timestamp value 'yesterday' is not Unix seconds or an ISO-8601 datetime; {TIME_PRESENT}",
}
EXPECTED_KEPT = ["r0", "r1", "r2", "r9", "r10", "r11", "r12", "r13", "r14"]


@pytest.fixture(scope="module")
def raw() -> pd.DataFrame:
    """The loader's view of a CSV: every cell a string, blanks as NaN."""
    return pd.read_csv(io.StringIO(EVENTS_CSV), dtype=str)


@pytest.fixture(scope="module")
def result(raw: pd.DataFrame) -> ValidationResult:
    return validate_interactions(raw, source="events.csv", expectations_dir=EXPECTATIONS, now=NOW)


def _validate(frame: pd.DataFrame, **kwargs) -> ValidationResult:
    kwargs.setdefault("now", NOW)
    return validate_interactions(frame, source="test", expectations_dir=EXPECTATIONS, **kwargs)


# ------------------------------------------------------------------ suites as files


@pytest.mark.parametrize("name", ["interactions_schema.json", "interactions_rows.json"])
def test_suite_files_are_gx_serialisations(name: str) -> None:
    import great_expectations as gx

    data = json.loads((EXPECTATIONS / name).read_text())
    assert gx.ExpectationSuite(**data).to_json_dict() == data
    assert all(set(e) >= {"type", "kwargs"} for e in data["expectations"])


def test_now_is_a_runtime_suite_parameter() -> None:
    data = json.loads((EXPECTATIONS / "interactions_rows.json").read_text())
    kwargs = [e["kwargs"] for e in data["expectations"] if e["kwargs"].get("column") == "timestamp"]
    assert {"$PARAMETER": "now"} in [k.get("max_value") for k in kwargs]


# ------------------------------------------------------------------ row-level quarantine


def test_bad_rows_are_quarantined_with_their_reasons(raw: pd.DataFrame, result: ValidationResult) -> None:
    q = result.quarantined
    assert q[SOURCE_ROW].tolist() == sorted(EXPECTED_REASONS)
    assert dict(zip(q[SOURCE_ROW], q[QUARANTINE_REASON])) == EXPECTED_REASONS
    # the quarantined rows are the raw rows exactly as given
    original = raw.iloc[q[SOURCE_ROW]].reset_index(drop=True)
    pd.testing.assert_frame_equal(q[list(raw.columns)], original)


def test_good_rows_are_kept_typed_and_in_order(result: ValidationResult) -> None:
    kept = result.kept
    assert kept["tag"].tolist() == EXPECTED_KEPT
    assert list(kept.columns) == [*REQUIRED_COLUMNS, "tag"]
    assert kept.index.equals(pd.RangeIndex(len(kept)))
    assert kept["timestamp"].dtype == np.int64 and kept["rating"].dtype == np.float64
    row1 = kept.iloc[1]
    assert (row1["user_id"], row1["event"], row1["timestamp"]) == ("u1", "cart", 1577836800)
    ratings = kept.set_index("tag")["rating"]
    assert ratings[["r2", "r14"]].tolist() == [4.0, 5.0]
    assert ratings.drop(["r2", "r14"]).isna().all()


def test_rows_are_conserved_and_report_counts(raw: pd.DataFrame, result: ValidationResult) -> None:
    report = result.report
    assert len(raw) == len(result.kept) + len(result.quarantined)
    assert (report["rows_in"], report["rows_kept"], report["rows_quarantined"]) == (18, 9, 9)
    assert report["suites"] == ["interactions_schema", "interactions_rows"]
    assert report["parameters"] == {"now": NOW, "min_interactions": 3, "max_quarantine_fraction": 0.2}
    by_name = {e["expectation"]: e for e in report["expectations"]}
    assert by_name[UNIQUE]["unexpected_count"] == 2 and by_name[UNIQUE]["rows_quarantined"] == 1
    assert by_name[IN_SET_EVENT]["success"] is False and by_name[IN_SET_EVENT]["columns"] == ["event"]
    assert by_name["expect_column_to_exist(timestamp)"]["success"] is True
    assert by_name["type(rating)"]["unexpected_count"] == 1
    assert result.passed is False and report["passed"] is False  # 9 / 18 > 0.2
    json.dumps(report)


def test_gate_threshold(raw: pd.DataFrame) -> None:
    assert _validate(raw, max_quarantine_fraction=0.5).passed is True


def test_min_interactions_argument_overrides_the_suite(raw: pd.DataFrame) -> None:
    res = _validate(raw, min_interactions=1)
    assert 15 not in set(res.quarantined[SOURCE_ROW]) and "r15" in set(res.kept["tag"])
    assert res.report["parameters"]["min_interactions"] == 1
    res = _validate(raw, min_interactions=4)  # u3 keeps 3 rows, u2 keeps 3: both fall below
    assert {"r9", "r12"} <= set(res.quarantined["tag"])


def test_now_parameter_bounds_timestamps(raw: pd.DataFrame) -> None:
    res = _validate(raw, now=NOW + 7200)
    assert "r6" in set(res.kept["tag"])


def test_typed_input_ints_and_datetimes() -> None:
    frame = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 2.0],
            "item_id": ["a", "b", "c", "d"],
            "event": ["view", "rating", "purchase", "view"],
            "rating": [np.nan, 3.5, np.nan, np.nan],
            "timestamp": pd.to_datetime(
                ["2020-01-01", "2020-01-02 00:00:01", "2020-01-03", "2030-01-01"], format="ISO8601"
            ),
        }
    )
    res = _validate(frame, min_interactions=1)
    assert res.kept["user_id"].tolist() == ["1", "1", "1"]
    assert res.kept["timestamp"].tolist() == [1577836800, 1577923201, 1578009600]
    assert res.quarantined[QUARANTINE_REASON].tolist() == [TIME_RANGE]  # 2030 is after now


def test_empty_frame_with_columns_is_valid() -> None:
    res = _validate(pd.DataFrame({c: pd.Series(dtype=str) for c in REQUIRED_COLUMNS}))
    assert res.kept.empty and res.quarantined.empty and res.passed
    assert res.report["rows_in"] == 0


# ------------------------------------------------------------------ schema breach


def test_missing_column_is_a_schema_breach(raw: pd.DataFrame) -> None:
    with pytest.raises(SchemaError, match="timestamp") as info:
        validate_interactions(
            raw.drop(columns=["timestamp"]), source="events.csv", expectations_dir=EXPECTATIONS, now=NOW
        )
    assert str(info.value) == "events.csv: missing required column(s): timestamp"
    assert info.value.missing == ("timestamp",)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------------ outputs


def test_write_quarantine_and_report_round_trip(tmp_path: Path, result: ValidationResult) -> None:
    qpath = write_quarantine(result, tmp_path / "out" / "quarantine.csv")
    back = pd.read_csv(qpath, dtype=str)
    expected = result.quarantined.astype({SOURCE_ROW: str})
    pd.testing.assert_frame_equal(back, expected, check_dtype=False)

    rpath = write_report(result, tmp_path / "out" / "report.json")
    assert json.loads(rpath.read_text()) == result.report
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quarantine.csv", "report.json"]


def test_empty_quarantine_still_has_a_header(tmp_path: Path, raw: pd.DataFrame) -> None:
    clean = raw.iloc[[0, 1, 2]]
    res = _validate(clean)
    assert res.quarantined.empty
    text = write_quarantine(res, tmp_path / "q.csv").read_text()
    assert text.strip() == ",".join([*raw.columns, SOURCE_ROW, QUARANTINE_REASON])


# ------------------------------------------------------------------ property: rows are conserved

_BAD = {
    "no_user": {"user_id": ""},
    "teleport": {"event": "teleport"},
    "rating7": {"event": "rating", "rating": "7"},
    "future": {"timestamp": str(NOW + 10**6)},
    "abc": {"rating": "abc"},
    "yesterday": {"timestamp": "yesterday"},
}
_KINDS = ["good", "good", "good", "dup", *_BAD]


def _rows(kinds: list[str]) -> tuple[pd.DataFrame, set[int]]:
    """Rows from kinds; returns the frame and the positions that must be quarantined."""
    rows, bad = [], set()
    for i, kind in enumerate(kinds):
        if kind == "dup" and rows:
            rows.append({**rows[-1], "tag": f"t{i}"})  # an exact repeat of the previous row
            bad.add(i)
            continue
        row = {
            "tag": f"t{i}",
            "user_id": f"u{i % 3}",
            "item_id": f"i{i}",
            "event": "view",
            "rating": "",
            "timestamp": str(1_000_000_000 + i),
        }
        row.update(_BAD.get(kind, {}))
        bad.update([i] if kind in _BAD else [])
        rows.append(row)
    columns = ["tag", *REQUIRED_COLUMNS]
    return pd.DataFrame(rows, columns=columns, dtype=str).replace("", np.nan), bad


@settings(max_examples=25, deadline=None)
@given(kinds=st.lists(st.sampled_from(_KINDS), max_size=30), min_interactions=st.sampled_from([1, 3]))
def test_random_mixes_conserve_rows(kinds: list[str], min_interactions: int) -> None:
    frame, bad = _rows(kinds)
    res = _validate(frame, min_interactions=min_interactions)
    assert len(frame) == len(res.kept) + len(res.quarantined)
    tags = sorted([*res.kept["tag"], *res.quarantined["tag"]], key=lambda t: int(t[1:]))
    assert tags == frame["tag"].tolist()
    quarantined = set(res.quarantined[SOURCE_ROW])
    assert quarantined == bad if min_interactions == 1 else quarantined >= bad
    assert res.quarantined[QUARANTINE_REASON].str.len().gt(0).all()
