"""The mapping between the shop's own ids and the contiguous indices the models use.

The map is saved with the model, so that serving takes and returns the shop's ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedml.data.schema import ITEM, USER
from fedml.files import atomic_write_text

FORMAT_VERSION = 1
_SHOWN_UNKNOWN = 10  # unknown ids listed in a KeyError


@dataclass(frozen=True)
class IdMap:
    """``users[u]`` / ``items[i]`` is the shop id of user index ``u`` / item index ``i``."""

    users: list[str]
    items: list[str]

    def __post_init__(self) -> None:
        for kind, ids in (("user", self.users), ("item", self.items)):
            if len(set(ids)) != len(ids):
                raise ValueError(f"duplicate {kind} ids in IdMap")

    @classmethod
    def from_frame(cls, df: pd.DataFrame) -> IdMap:
        """Sorted distinct user and item ids of a canonical frame → indices ``0..n-1``."""
        return cls(users=_sorted_ids(df[USER], USER), items=_sorted_ids(df[ITEM], ITEM))

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def user_index(self, ids: Iterable[str], errors: Literal["raise", "ignore"] = "raise") -> np.ndarray:
        """int64 indices of shop user ids; unknown ids raise KeyError, or give -1 with ``errors="ignore"``."""
        return _lookup(self._user_lookup, ids, "user", errors)

    def item_index(self, ids: Iterable[str], errors: Literal["raise", "ignore"] = "raise") -> np.ndarray:
        """int64 indices of shop item ids; unknown ids raise KeyError, or give -1 with ``errors="ignore"``."""
        return _lookup(self._item_lookup, ids, "item", errors)

    def user_ids(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        """Shop ids of user indices (IndexError for an index outside ``0..n_users-1``)."""
        return _take(self._user_array, indices, "user")

    def item_ids(self, indices: Iterable[int] | np.ndarray) -> list[str]:
        """Shop ids of item indices (IndexError for an index outside ``0..n_items-1``)."""
        return _take(self._item_array, indices, "item")

    def to_json(self, path: str | Path) -> None:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        atomic_write_text(path, json.dumps({"version": FORMAT_VERSION, "users": self.users, "items": self.items}))

    @classmethod
    def from_json(cls, path: str | Path) -> IdMap:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not an IdMap JSON file: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not an IdMap JSON file of version {FORMAT_VERSION}")
        for key in ("users", "items"):
            if not isinstance(data.get(key), list) or not all(isinstance(x, str) for x in data[key]):
                raise ValueError(f"{path}: {key!r} must be a list of strings")
        return cls(users=data["users"], items=data["items"])

    @cached_property
    def _user_lookup(self) -> pd.Index:
        return pd.Index(self.users, dtype="str")

    @cached_property
    def _item_lookup(self) -> pd.Index:
        return pd.Index(self.items, dtype="str")

    @cached_property
    def _user_array(self) -> np.ndarray:
        return np.array(self.users, dtype=object)

    @cached_property
    def _item_array(self) -> np.ndarray:
        return np.array(self.items, dtype=object)


def _sorted_ids(column: pd.Series, name: str) -> list[str]:
    if column.isna().any():
        raise ValueError(f"column {name!r} has missing ids")
    return sorted(str(x) for x in pd.unique(column))


def _lookup(index: pd.Index, ids: Iterable[str], kind: str, errors: str) -> np.ndarray:
    if errors not in ("raise", "ignore"):
        raise ValueError(f"errors must be 'raise' or 'ignore', got {errors!r}")
    values = ids if isinstance(ids, (pd.Series, pd.Index, np.ndarray)) else list(ids)
    result = pd.Categorical(values, categories=index).codes.astype(np.int64)  # fastest lookup
    if errors == "raise" and (result < 0).any():
        unknown = pd.unique(np.asarray(values, dtype=object)[result < 0])
        shown = ", ".join(repr(x) for x in unknown[:_SHOWN_UNKNOWN])
        more = f" and {len(unknown) - _SHOWN_UNKNOWN} more" if len(unknown) > _SHOWN_UNKNOWN else ""
        raise KeyError(f"{len(unknown)} unknown {kind} id(s): {shown}{more}")
    return result


def _take(array: np.ndarray, indices: Iterable[int] | np.ndarray, kind: str) -> list[str]:
    idx = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
    bad = (idx < 0) | (idx >= len(array))
    if bad.any():
        raise IndexError(f"{kind} index {int(idx[bad][0])} out of range 0..{len(array) - 1}")
    return array[idx].tolist()


__all__ = ["IdMap"]
