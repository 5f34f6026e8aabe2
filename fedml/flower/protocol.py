"""What travels between our ServerApp and ClientApp (the node side: :mod:`fedml.flower.node_data`).

Messages (all records are Flower ``RecordDict`` entries):

* ``query`` (server -> node, empty) -> ``inventory`` (:mod:`fedml.flower.node_data`): the node's
  shoppers, their example counts and the data set's sizes.
* ``train`` (server -> node): the global item table, the local hyper-parameters, seed, round and the
  round's sampled shoppers that live on this node -> ``updates``: each shopper's touched rows and their
  deltas (concatenated, with offsets), example counts and local losses. User vectors never leave.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from fedml.federated.client import ClientUpdate, LocalTraining
from fedml.flower.node_data import arrays as _arrays
from fedml.models.mf import ItemTable

TABLE = "table"
CONFIG = "config"
UPDATES = "updates"
# Messages


def train_content(
    table: ItemTable, local: LocalTraining, seed: int, round_index: int, clients: list[int]
) -> RecordDict:
    return RecordDict(
        {
            TABLE: _arrays(table.to_numpy()),
            CONFIG: ConfigRecord({**asdict(local), "seed": int(seed), "round": int(round_index), "clients": clients}),
        }
    )


@dataclass(frozen=True)
class TrainRequest:
    table: ItemTable
    local: LocalTraining
    seed: int
    round: int
    clients: list[int]


def read_train_request(content: RecordDict) -> TrainRequest:
    config = content[CONFIG]
    local = LocalTraining(**{name: config[name] for name in LocalTraining.__dataclass_fields__})
    table = ItemTable.from_numpy({name: array.numpy() for name, array in content[TABLE].items()})
    return TrainRequest(table, local, int(config["seed"]), int(config["round"]), [int(c) for c in config["clients"]])


def updates_content(clients: list[int], updates: list[ClientUpdate], dim: int) -> RecordDict:
    """Each shopper's upload: rows, deltas (concatenated in ``clients`` order), n_k and local loss."""
    sizes = [len(u.rows) for u in updates]
    values = {
        "clients": np.asarray(clients, dtype=np.int64),
        "offsets": np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64),
        "rows": _cat([u.rows.cpu().numpy() for u in updates], np.int64, (0,)),
        "delta_embeddings": _cat([u.delta_embeddings.cpu().numpy() for u in updates], np.float32, (0, dim)),
        "delta_bias": _cat([u.delta_bias.cpu().numpy() for u in updates], np.float32, (0,)),
        "num_examples": np.array([u.num_examples for u in updates], dtype=np.int64),
        "losses": np.array([u.loss for u in updates], dtype=np.float64),
    }
    return RecordDict({UPDATES: _arrays(values)})


def read_updates(content: RecordDict) -> list[tuple[int, ClientUpdate]]:
    """The (shopper, upload) pairs of a node's reply."""
    record = {name: array.numpy() for name, array in content[UPDATES].items()}
    offsets = record["offsets"]
    result = []
    for i, client in enumerate(record["clients"].tolist()):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        update = ClientUpdate(
            rows=torch.from_numpy(record["rows"][lo:hi].copy()),
            delta_embeddings=torch.from_numpy(record["delta_embeddings"][lo:hi].copy()),
            delta_bias=torch.from_numpy(record["delta_bias"][lo:hi].copy()),
            num_examples=int(record["num_examples"][i]),
            loss=float(record["losses"][i]),
        )
        result.append((int(client), update))
    return result


def _cat(parts: list[np.ndarray], dtype: type, empty_shape: tuple[int, ...]) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.zeros(empty_shape, dtype=dtype)
