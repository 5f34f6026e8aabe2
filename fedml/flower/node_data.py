"""The shopper data a SuperNode holds, and the inventory it reports (numpy only: no torch import).

A node's data file is an ``.npz`` of :class:`~fedml.data.interactions.UserItems` (``indptr``, ``items``,
``n_users``, ``n_items``); a node holds one contiguous block of its shoppers (``partition-id`` of
``num-partitions``). The inventory (reply to the server's ``query``) lists the node's shoppers
(global indices) and their example counts: counts are public in our DP model, as in
:meth:`fedml.federated.aggregation.DPFedAvg.for_population`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from fedml.data.interactions import UserItems

INVENTORY = "inventory"
METRICS = "metrics"


def save_user_items(path: str | Path, data: UserItems, shoppers: np.ndarray | None = None) -> Path:
    """Write shoppers' positives as a node's data file (``.npz``: indptr, items, n_users, n_items).

    ``shoppers`` (global indices): keep only their rows (a device's file); the others are written
    empty, so the file keeps the population's size and the shoppers their global indices.
    """
    if shoppers is not None:
        keep = np.zeros(data.n_users, dtype=bool)
        keep[np.asarray(shoppers, dtype=np.int64)] = True
        counts = np.where(keep, np.diff(data.indptr), 0)
        rows = np.repeat(keep, np.diff(data.indptr))
        data = UserItems(
            indptr=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            items=data.items[rows],
            n_users=data.n_users,
            n_items=data.n_items,
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, indptr=data.indptr, items=data.items, n_users=data.n_users, n_items=data.n_items)
    return path


def load_user_items(path: str | Path) -> UserItems:
    """Read a node's data file written by :func:`save_user_items`."""
    try:
        with np.load(path) as z:
            return UserItems(indptr=z["indptr"], items=z["items"], n_users=int(z["n_users"]), n_items=int(z["n_items"]))
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"node data file {path}: not a shopper data file ({error})") from error


def partition(n_users: int, partition_id: int, num_partitions: int) -> np.ndarray:
    """The shoppers (global indices) of one partition: contiguous blocks of sizes differing by at most one."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), got {partition_id}")
    return np.array_split(np.arange(n_users, dtype=np.int64), num_partitions)[partition_id]


def arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in values.items()})


def inventory_content(clients: np.ndarray, counts: np.ndarray, n_users: int, n_items: int) -> RecordDict:
    return RecordDict(
        {
            INVENTORY: arrays({"clients": clients.astype(np.int64), "counts": counts.astype(np.int64)}),
            METRICS: MetricRecord({"n-users": int(n_users), "n-items": int(n_items)}),
        }
    )


@dataclass(frozen=True)
class Inventory:
    clients: np.ndarray  # int64: global shopper indices
    counts: np.ndarray  # int64: their example counts
    n_users: int
    n_items: int


def read_inventory(content: RecordDict) -> Inventory:
    record, metrics = content[INVENTORY], content[METRICS]
    return Inventory(
        record["clients"].numpy(), record["counts"].numpy(), int(metrics["n-users"]), int(metrics["n-items"])
    )
