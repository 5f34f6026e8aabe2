"""Validate a raw interactions table with two Great Expectations suites.

Design
------
Both suites are kept in ``expectations/`` in GX's own suite serialisation
(``ExpectationSuite.to_json_dict()``) and turned into ``gx.ExpectationSuite`` objects at run time.

* ``interactions_schema.json`` (table level): the required columns exist and, after type
  coercion, have sane types. A failure is a *schema breach*: :class:`SchemaError` is raised and the
  run stops, because no row of such a table can be trusted. Extra columns are allowed.
* ``interactions_rows.json`` (row level): ids and event present, event in the vocabulary, rating in
  [1, 5] (NaN allowed, but not for a ``rating`` event), timestamp between 1990-01-01 and the
  run-time suite parameter ``now``, unique (user_id, item_id, event, timestamp). Expectations with
  ``meta.stage == "survivors"`` run afterwards on the rows that passed everything else; the shipped
  one checks the derived column ``user_interactions`` (the shopper's number of surviving rows)
  against ``min_interactions``. A failing row is *quarantined* with the names of the expectations
  it failed; the other rows are kept.

Row failures come from GX itself (``result_format="COMPLETE"`` gives ``unexpected_index_list`` on a
frame with a clean RangeIndex). pandas is only used to coerce types and to derive the count column.

* Coercion: ids and event are stripped strings (event lower-cased), rating a float,
  timestamp int64 Unix seconds (ints, numeric strings, ISO-8601 strings, datetimes; naive times are
  UTC). In every column a blank cell or a null word (``NA``, ``null``, ``None``, ``nan``, ``#N/A``,
  ... any case: pandas' CSV null words) is null, so a CSV file and a Parquet file with the same text
  give the same result, and rows with a "NULL" shopper are not merged into one shopper. An
  unparseable value quarantines its row with a ``type: ...`` reason (an unparseable timestamp also
  fails the not-null expectation, as it is null after coercion).
* A table with a repeated column name is a schema breach (which column would be the shopper?).
* Duplicates: GX flags every row of a repeated key; the first occurrence (input order) is kept and
  only the later repeats are quarantined.
* Empty input with the required columns is valid: nothing kept, nothing quarantined, ``passed`` is
  True (the gate is about quality, not size).
* GX 1.24 does not recognise pandas 3's ``str`` dtype in ``expect_column_values_to_be_in_type_list``,
  so string columns are handed to GX as ``object``; GX then checks every value's Python type.
  The nullable timestamp column (``Int64`` while validating) matches only ``"Int64Dtype"``.
* A relative ``expectations_dir`` is looked up in the working directory, then the project root.

Invariant: ``len(raw) == len(kept) + len(quarantined)``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedml.data.schema import (
    EVENT,
    ITEM,
    MAX_ABS_SECONDS,
    QUARANTINE_REASON,
    RATING,
    REQUIRED_COLUMNS,
    TIMESTAMP,
    USER,
)
from fedml.files import atomic_write, atomic_write_text

SCHEMA_SUITE_FILE = "interactions_schema.json"
ROWS_SUITE_FILE = "interactions_rows.json"
SOURCE_ROW = "source_row"
#: Derived per-row column for the survivor stage: that shopper's number of surviving rows.
USER_INTERACTIONS = "user_interactions"
SURVIVORS_STAGE = "survivors"
NOW_PARAMETER = "now"

_STRING_COLUMNS = (USER, ITEM, EVENT)
#: Null words, compared lower-cased: pandas' CSV defaults (pandas._libs.parsers.STR_NA_VALUES) and "nat".
_MISSING_TOKENS = frozenset(
    {"", "#n/a", "#n/a n/a", "#na", "-1.#ind", "-1.#qnan", "-nan", "1.#ind", "1.#qnan", "<na>", "n/a", "na"}
    | {"nan", "null", "none", "nat"}
)
_UNIQUENESS = frozenset({"expect_compound_columns_to_be_unique", "expect_column_values_to_be_unique"})
_RESULT_FORMAT = {"result_format": "COMPLETE", "return_unexpected_index_query": False}
_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class SchemaError(ValueError):
    """The table breaks the schema suite (e.g. a required column is missing); the run must stop."""

    def __init__(self, message: str, *, source: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.source = source
        self.missing = missing


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_interactions`."""

    kept: pd.DataFrame  # typed canonical frame of the rows that passed, extra columns kept, index reset
    quarantined: pd.DataFrame  # original raw rows that failed + SOURCE_ROW + QUARANTINE_REASON
    report: dict  # JSON-serialisable summary, see validate_interactions
    passed: bool  # schema ok and quarantined fraction <= max_quarantine_fraction


# --------------------------------------------------------------------------- suites


def resolve_expectations_dir(expectations_dir: str | Path) -> Path:
    """A relative directory is looked up in the working directory, then in the project root."""
    path = Path(expectations_dir)
    if path.is_dir() or path.is_absolute():
        return path
    fallback = _PROJECT_ROOT / path
    return fallback if fallback.is_dir() else path


def load_suite_dict(path: str | Path) -> dict[str, Any]:
    """Read one GX-serialised suite file (``name`` + ``expectations`` of ``type``/``kwargs``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expectation suite not found: {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "name" not in data or not isinstance(data.get("expectations"), list):
        raise ValueError(f"{path}: not a GX expectation suite (needs 'name' and 'expectations')")
    return data


def build_suite(data: dict[str, Any], expectations: list[dict] | None = None, name: str | None = None) -> Any:
    """Turn a suite dict (optionally a subset of its expectations) into a ``gx.ExpectationSuite``."""
    import great_expectations as gx

    return gx.ExpectationSuite(
        name=name or data["name"],
        expectations=[dict(e) for e in (data["expectations"] if expectations is None else expectations)],
        meta=data.get("meta") or {},
        notes=data.get("notes"),
    )


def _split_stages(data: dict[str, Any], min_interactions: int | None) -> tuple[list[dict], list[dict]]:
    """Row-suite expectations -> (first stage, survivor stage with ``min_interactions`` applied)."""
    first, survivors, overridden = [], [], False
    for exp in data["expectations"]:
        if (exp.get("meta") or {}).get("stage") != SURVIVORS_STAGE:
            first.append(exp)
            continue
        exp = json.loads(json.dumps(exp))  # deep copy: the override must not leak
        kwargs = exp["kwargs"]
        is_minimum = kwargs.get("column") == USER_INTERACTIONS and "min_value" in kwargs
        if min_interactions is not None and is_minimum:
            kwargs["min_value"] = int(min_interactions)
            overridden = True
        survivors.append(exp)
    if min_interactions is not None and not overridden:
        raise ValueError(f"row suite has no survivor-stage min_value on {USER_INTERACTIONS!r} to override")
    return first, survivors


def _effective_min_interactions(survivors: list[dict]) -> int | None:
    for exp in survivors:
        if exp["kwargs"].get("column") == USER_INTERACTIONS and "min_value" in exp["kwargs"]:
            return int(exp["kwargs"]["min_value"])
    return None


def expectation_label(expectation_type: str, kwargs: dict[str, Any]) -> str:
    """``expect_column_values_to_be_in_set(event)``; a row condition is appended as ``where ...``."""
    columns = _columns(kwargs)
    label = f"{expectation_type}({','.join(columns)}"
    condition = kwargs.get("row_condition")
    if isinstance(condition, dict):
        condition = condition.get("pass_through_filter") or json.dumps(condition, sort_keys=True)
    elif condition is not None and not isinstance(condition, str):
        condition = getattr(condition, "pass_through_filter", None) or str(condition)
    return f"{label} where {condition})" if condition else f"{label})"


def _columns(kwargs: dict[str, Any]) -> list[str]:
    if "column" in kwargs:
        return [str(kwargs["column"])]
    if "column_list" in kwargs:
        return [str(c) for c in kwargs["column_list"]]
    return [str(kwargs[k]) for k in ("column_A", "column_B") if k in kwargs]


# --------------------------------------------------------------------------- GX runtime

_GX_LOCK = threading.Lock()
_GX_BATCH_DEFINITION: Any = None


def _batch_definition() -> Any:
    """One ephemeral GX context per process, progress bars off, with a whole-dataframe batch."""
    global _GX_BATCH_DEFINITION
    with _GX_LOCK:
        if _GX_BATCH_DEFINITION is None:
            import great_expectations as gx
            from great_expectations.data_context.types.base import ProgressBarsConfig

            ctx = gx.get_context(mode="ephemeral")
            ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
            asset = ctx.data_sources.add_pandas("fedml_validation").add_dataframe_asset("interactions")
            _GX_BATCH_DEFINITION = asset.add_batch_definition_whole_dataframe("whole_frame")
        return _GX_BATCH_DEFINITION


def run_suite(frame: pd.DataFrame, suite: Any, parameters: dict[str, Any] | None = None) -> list[Any]:
    """Validate ``frame`` against ``suite`` (COMPLETE results); returns the expectation results."""
    batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(suite, result_format=_RESULT_FORMAT, expectation_parameters=parameters or None)
    order = {_config_label(e.configuration): i for i, e in enumerate(suite.expectations)}
    return sorted(result.results, key=lambda r: order.get(_label_of(r), len(order)))  # GX regroups them


def _raised(result: Any) -> str | None:
    """The exception message of an expectation that errored, else None."""
    info = result.exception_info or {}
    if "raised_exception" in info:
        return info.get("exception_message") if info.get("raised_exception") else None
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return value.get("exception_message")
    return None


def _config_label(config: Any) -> str:
    return expectation_label(config.type, dict(config.kwargs))


def _label_of(result: Any) -> str:
    return _config_label(result.expectation_config)


# --------------------------------------------------------------------------- coercion


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and bool(np.isnan(value))


def _clean_text(value: Any) -> Any:
    """Id/event cell -> stripped str, or NaN for null/blank (integral floats lose their ``.0``)."""
    if _is_missing(value):
        return np.nan
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        value = int(value)
    text = str(value).strip()
    return np.nan if text.lower() in _MISSING_TOKENS else text


def _blank_to_nan(value: Any) -> Any:
    """Numeric cell: strip strings, and treat blank / 'nan' / 'null' ... as missing."""
    if _is_missing(value):
        return np.nan
    if isinstance(value, str):
        text = value.strip()
        return np.nan if text.lower() in _MISSING_TOKENS else text
    return value


def _datetimes_to_seconds(values: pd.Series) -> pd.Series:
    """Datetimes (naive = UTC) -> float Unix seconds, floored; NaT -> NaN.

    Any unit and year: numpy's unit cast, not a subtraction in nanoseconds, which overflowed past 2262.
    """
    stamps = pd.to_datetime(values, utc=True).dt.tz_convert(None).to_numpy().astype("datetime64[s]")
    seconds = stamps.astype("int64").astype("float64")
    seconds[np.isnat(stamps)] = np.nan
    return pd.Series(seconds, index=values.index)


def _one_iso_to_seconds(value: Any) -> float:
    try:
        stamp = pd.Timestamp(value) if not isinstance(value, str) else pd.to_datetime(value, format="ISO8601")
    except (TypeError, ValueError, OverflowError):
        return np.nan
    if pd.isna(stamp):
        return np.nan
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return float(np.floor(stamp.timestamp()))  # no nanosecond subtraction: it overflows past 2262


def _iso_to_seconds(values: pd.Series) -> pd.Series:
    """ISO-8601 strings / datetime objects -> float Unix seconds; unparseable -> NaN."""
    try:
        parsed = pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
        return _datetimes_to_seconds(parsed)
    except (TypeError, ValueError, OverflowError):
        return values.map(_one_iso_to_seconds).astype("float64")


def _to_numbers(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """-> (float64 values, the cleaned cells that were present)."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        numbers = values.astype("float64")
        return numbers, numbers
    cleaned = values.astype(object).map(_blank_to_nan)
    return pd.to_numeric(cleaned, errors="coerce").astype("float64"), cleaned


def coerce_rating(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """-> (float64 ratings, mask of present values that are not numbers)."""
    numbers, cleaned = _to_numbers(values)
    return numbers, cleaned.notna() & numbers.isna()


def coerce_timestamp(values: pd.Series) -> tuple[pd.Series, pd.Series]:
    """-> (nullable Int64 Unix seconds, mask of present values that are not times)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        seconds = _datetimes_to_seconds(values)
        return seconds.astype("Int64"), pd.Series(False, index=values.index)
    numbers, cleaned = _to_numbers(values)
    numbers = numbers.where(np.isfinite(numbers) & (numbers.abs() <= MAX_ABS_SECONDS))
    seconds = np.floor(numbers)
    pending = cleaned.notna() & seconds.isna()
    if pending.any():
        seconds[pending] = _iso_to_seconds(cleaned[pending].astype(object)).to_numpy()
    seconds = seconds.where(seconds.abs() <= MAX_ABS_SECONDS)
    return seconds.astype("Int64"), cleaned.notna() & seconds.isna()


def coerce_interactions(raw: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Coerce the required columns that are present (positional index assumed).

    Returns the typed frame (string columns as ``object`` for GX, rating float64, timestamp
    nullable Int64) and ``{row: ["type: ..."]}`` for cells that could not be parsed.
    """
    typed = pd.DataFrame(index=raw.index)
    errors: dict[int, list[str]] = {}
    for column in REQUIRED_COLUMNS:
        if column not in raw.columns:
            continue
        values = raw[column]
        if column in _STRING_COLUMNS:
            cleaned = values.astype(object).map(_clean_text).astype(object)
            if column == EVENT:
                cleaned = cleaned.map(str.lower, na_action="ignore").astype(object)
            typed[column] = cleaned
            continue
        if column == RATING:
            typed[column], bad = coerce_rating(values)
            what = "is not a number"
        else:
            typed[column], bad = coerce_timestamp(values)
            what = "is not Unix seconds or an ISO-8601 datetime"
        for row in np.flatnonzero(bad.to_numpy()):
            errors.setdefault(int(row), []).append(f"type: {column} value {_show(values.iloc[row])} {what}")
    return typed, errors


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


# --------------------------------------------------------------------------- stages


def _check_schema(typed: pd.DataFrame, suite: Any, source: str) -> list[Any]:
    """Run the schema suite; raise :class:`SchemaError` on any failure."""
    results = run_suite(typed, suite)
    missing = [
        r.expectation_config.kwargs["column"]
        for r in results
        if r.expectation_config.type == "expect_column_to_exist" and not r.success
    ]
    problems = [f"missing required column(s): {', '.join(missing)}"] if missing else []
    for r in results:
        column = r.expectation_config.kwargs.get("column")
        if r.success or r.expectation_config.type == "expect_column_to_exist" or column in missing:
            continue
        observed = (r.result or {}).get("observed_value") or _raised(r) or "unexpected values"
        problems.append(f"{_label_of(r)} failed ({observed})")
    if problems:
        raise SchemaError(f"{source}: {'; '.join(problems)}", source=source, missing=tuple(missing))
    return results


def _refuse_repeated_columns(raw: pd.DataFrame, source: str) -> None:
    repeated = sorted({str(c) for c in raw.columns[raw.columns.duplicated()]})
    if repeated:
        raise SchemaError(f"{source}: column(s) {', '.join(repeated)} appear more than once", source=source)


def _row_failures(frame: pd.DataFrame, results: list[Any]) -> dict[str, list[int]]:
    """``{label: [row, ...]}`` from GX's unexpected_index_list; uniqueness keeps first occurrences."""
    failures: dict[str, list[int]] = {}
    for r in results:
        label = _label_of(r)
        if (message := _raised(r)) is not None:
            raise RuntimeError(f"row expectation {label} could not run: {message}")
        if r.success:
            failures[label] = []
            continue
        index = (r.result or {}).get("unexpected_index_list")
        if index is None:
            raise ValueError(f"{label} does not report rows; table-level checks belong in the schema suite")
        rows = sorted(int(i) for i in index)
        if r.expectation_config.type in _UNIQUENESS:
            keys = frame.loc[rows, _columns(dict(r.expectation_config.kwargs))]
            rows = [int(i) for i in keys.index[keys.duplicated(keep="first")]]
        failures[label] = rows
    return failures


def _survivor_frame(typed: pd.DataFrame, survivors: np.ndarray) -> pd.DataFrame:
    """Surviving rows (clean RangeIndex) plus the derived per-shopper count column."""
    frame = typed.iloc[survivors].reset_index(drop=True)
    frame[USER_INTERACTIONS] = frame.groupby(USER, dropna=False)[USER].transform("size").astype("int64")
    return frame


def _entry(suite: str, result: Any, quarantined_rows: list[int]) -> dict[str, Any]:
    """One report line for one GX expectation result."""
    config = result.expectation_config
    return {
        "suite": suite,
        "expectation": _label_of(result),
        "type": config.type,
        "columns": _columns(dict(config.kwargs)),
        "success": bool(result.success),
        "unexpected_count": int((result.result or {}).get("unexpected_count") or 0),
        "rows_quarantined": len(quarantined_rows),
    }


# --------------------------------------------------------------------------- public API


def validate_interactions(
    raw: pd.DataFrame,
    *,
    source: str,
    expectations_dir: str | Path = "expectations",
    min_interactions: int | None = None,
    max_quarantine_fraction: float = 0.2,
    now: int | None = None,
) -> ValidationResult:
    """Validate ``raw`` interactions: a schema breach raises, failing rows are quarantined.

    ``min_interactions`` overrides the survivor-stage minimum in the row suite; ``now`` (Unix
    seconds, default: the current time) is the suite parameter bounding timestamps from above.
    The report holds source, suites, parameters, row counts and one entry per expectation
    (``expectation``, ``columns``, ``success``, GX's ``unexpected_count``, ``rows_quarantined``).
    """
    started = time.perf_counter()
    raw = raw.reset_index(drop=True)
    now = int(time.time()) if now is None else int(now)
    directory = resolve_expectations_dir(expectations_dir)
    schema_data = load_suite_dict(directory / SCHEMA_SUITE_FILE)
    rows_data = load_suite_dict(directory / ROWS_SUITE_FILE)
    first_stage, survivor_stage = _split_stages(rows_data, min_interactions)

    _refuse_repeated_columns(raw, source)
    typed, type_errors = coerce_interactions(raw)
    schema_results = _check_schema(typed, build_suite(schema_data), source)
    entries = [_entry(schema_data["name"], r, []) for r in schema_results] + _type_entries(type_errors)

    reasons: list[list[str]] = [list(type_errors.get(i, ())) for i in range(len(raw))]
    entries += _run_row_stage(typed, build_suite(rows_data, first_stage), now, reasons)
    if survivor_stage:
        survivors = np.flatnonzero(np.array([not r for r in reasons], dtype=bool))
        suite = build_suite(rows_data, survivor_stage, name=f"{rows_data['name']}.{SURVIVORS_STAGE}")
        entries += _run_row_stage(_survivor_frame(typed, survivors), suite, now, reasons, survivors)

    keep = np.array([not r for r in reasons], dtype=bool)
    kept = _kept_frame(raw, typed, keep)
    quarantined = _quarantined_frame(raw, reasons, keep)
    fraction = float(len(quarantined) / len(raw)) if len(raw) else 0.0
    passed = bool(fraction <= max_quarantine_fraction)
    report = {
        "source": source,
        "suites": [schema_data["name"], rows_data["name"]],
        "expectations_dir": str(directory),
        "parameters": {
            NOW_PARAMETER: now,
            "min_interactions": _effective_min_interactions(survivor_stage),
            "max_quarantine_fraction": float(max_quarantine_fraction),
        },
        "rows_in": len(raw),
        "rows_kept": len(kept),
        "rows_quarantined": len(quarantined),
        "quarantine_fraction": fraction,
        "expectations": entries,
        "passed": passed,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return ValidationResult(kept=kept, quarantined=quarantined, report=report, passed=passed)


def _run_row_stage(
    frame: pd.DataFrame, suite: Any, now: int, reasons: list[list[str]], positions: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """Validate one row stage; append failed labels to ``reasons`` (``positions``: frame row -> input row)."""
    results = run_suite(frame, suite, {NOW_PARAMETER: now})
    failures = _row_failures(frame, results)
    for label, rows in failures.items():
        for row in rows:
            reasons[row if positions is None else int(positions[row])].append(label)
    return [_entry(suite.name, r, failures[_label_of(r)]) for r in results]


def _type_entries(type_errors: dict[int, list[str]]) -> list[dict[str, Any]]:
    entries = []
    for column in (RATING, TIMESTAMP):
        count = sum(1 for msgs in type_errors.values() for m in msgs if m.startswith(f"type: {column} "))
        entries.append(
            {
                "suite": "coercion",
                "expectation": f"type({column})",
                "type": "type_coercion",
                "columns": [column],
                "success": count == 0,
                "unexpected_count": count,
                "rows_quarantined": count,
            }
        )
    return entries


def _kept_frame(raw: pd.DataFrame, typed: pd.DataFrame, keep: np.ndarray) -> pd.DataFrame:
    """Canonical typed columns first, then the raw extra columns, for the kept rows."""
    kept = typed.loc[keep, list(REQUIRED_COLUMNS)].reset_index(drop=True)
    for column in _STRING_COLUMNS:
        kept[column] = kept[column].astype("str")
    kept[RATING] = kept[RATING].astype("float64")
    kept[TIMESTAMP] = kept[TIMESTAMP].astype("int64")
    extras = [c for c in raw.columns if c not in REQUIRED_COLUMNS]
    if extras:
        kept = pd.concat([kept, raw.loc[keep, extras].reset_index(drop=True)], axis=1)
    return kept


def _quarantined_frame(raw: pd.DataFrame, reasons: list[list[str]], keep: np.ndarray) -> pd.DataFrame:
    """The raw failing rows as given, plus their input position and reasons."""
    rows = np.flatnonzero(~keep)
    quarantined = raw.iloc[rows].reset_index(drop=True)
    quarantined[SOURCE_ROW] = rows.astype("int64")
    quarantined[QUARANTINE_REASON] = pd.Series(["; ".join(reasons[i]) for i in rows], dtype=object)
    return quarantined


def write_quarantine(result: ValidationResult, path: str | Path) -> Path:
    """Write the quarantined rows as CSV (header even when empty), atomically."""
    return atomic_write(path, lambda handle: result.quarantined.to_csv(handle, index=False))


def write_report(result: ValidationResult, path: str | Path) -> Path:
    """Write the validation report as JSON, atomically."""
    return atomic_write_text(path, json.dumps(result.report, indent=2) + "\n")


__all__ = [
    "SchemaError",
    "ValidationResult",
    "validate_interactions",
    "write_quarantine",
    "write_report",
    "coerce_interactions",
    "load_suite_dict",
    "build_suite",
    "SOURCE_ROW",
    "USER_INTERACTIONS",
]
