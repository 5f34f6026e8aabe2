"""One entry point for every data source: ``load_source(config.data)``."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedml.config import ConfigError, DataConfig
from fedml.data.events import load_events
from fedml.data.movielens import load_movielens_100k
from fedml.data.schema import REQUIRED_COLUMNS
from fedml.data.synthetic import generate_shop
from fedml.data.tmall import load_tmall

FINGERPRINT_CHARS = 16


@dataclass
class SourceData:
    interactions: pd.DataFrame  # canonical frame (raw, not yet validated, for the events source)
    catalogue: pd.DataFrame | None  # only the synthetic shop has one
    name: str  # "synthetic(...)" with its parameters, or the file / folder name
    fingerprint: str  # see fingerprint()


def load_source(config: DataConfig) -> SourceData:
    """Generate or read the interactions named by ``config.source``."""
    if config.source == "synthetic":
        shop = generate_shop(
            config.n_shoppers, config.n_items, config.n_categories,
            mean_sessions=config.mean_sessions, seed=config.seed,
        )  # fmt: skip
        name = (
            f"synthetic(n_shoppers={config.n_shoppers}, n_items={config.n_items}, "
            f"n_categories={config.n_categories}, mean_sessions={config.mean_sessions}, seed={config.seed})"
        )
        return SourceData(shop.interactions, shop.catalogue, name, fingerprint(shop.interactions))
    readers = {"movielens": load_movielens_100k, "tmall": load_tmall, "events": load_events}
    if config.source not in readers:
        raise ConfigError(f"data.source must be one of synthetic, {', '.join(readers)}; got {config.source!r}")
    if not config.path:
        raise ConfigError(f"data.path must name the file or folder to read for data.source={config.source!r}")
    interactions = readers[config.source](config.path)
    return SourceData(interactions, None, Path(config.path).name, fingerprint(interactions))


def fingerprint(df: pd.DataFrame) -> str:
    """First 16 hex characters of a sha256 over the canonical columns' content.

    Order-independent: it identifies the multiset of rows restricted to the canonical columns
    present, so row order, the index and extra columns do not change it. Integer columns are
    hashed as little-endian int64, other numeric columns as float64 (NaN and -0.0 normalised),
    anything else as ``str`` of each value (missing values kept apart), after sorting the rows by
    value: no pandas hashing or formatting is involved, so the result is the same in every
    process and pandas version. A raw (string-typed) frame and its validated form differ.
    """
    columns = [c for c in REQUIRED_COLUMNS if c in df.columns]
    encoded = [_encode_column(df[c]) for c in columns]
    order = np.lexsort([values for _, _, values in reversed(encoded)]) if columns else np.arange(0)
    digest = hashlib.sha256()
    header = {"columns": columns, "kinds": [kind for kind, _, _ in encoded], "rows": len(df)}
    digest.update(json.dumps(header).encode())
    for _, dictionary, values in encoded:
        digest.update(json.dumps(dictionary, ensure_ascii=False).encode("utf-8", "surrogatepass"))
        digest.update(values[order].tobytes())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def _encode_column(column: pd.Series) -> tuple[str, list[str] | None, np.ndarray]:
    """(kind, sorted dictionary for strings, little-endian values whose order is the value order)."""
    if (pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column)) and not column.isna().any():
        return "int64", None, column.to_numpy(np.int64).astype("<i8")
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        values = column.to_numpy(np.float64, na_value=np.nan) + 0.0  # -0.0 -> 0.0
        values[np.isnan(values)] = np.nan  # one NaN bit pattern
        return "float64", None, values.astype("<f8")
    codes, uniques = pd.factorize(column)  # missing -> -1
    labels = [str(u) for u in uniques]
    dictionary = sorted(set(labels))
    rank = {label: i for i, label in enumerate(dictionary)}
    ranks = np.array([rank[label] for label in labels] + [-1], dtype="<i8")
    return "str", dictionary, ranks[codes]


__all__ = ["SourceData", "load_source", "fingerprint", "FINGERPRINT_CHARS"]
