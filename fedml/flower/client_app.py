"""The ClientApp a SuperNode runs: our client update on the shoppers this node holds.

Node config (``flower-supernode --node-config``): ``data-file`` (a shopper data file, see
:func:`fedml.flower.node_data.save_user_items`), and optionally ``partition-id`` / ``num-partitions``
(the node holds that contiguous block of the file's shoppers; default: all of them). The node holds
the shoppers of its block that have data: a device's file keeps the population's size but only its
own shoppers' rows.

User vectors are private: they live in the node's ``Context.state`` (kept by the SuperNode across
the messages of a run) and never travel. A shopper trained for the first time starts from the
fold-in of its history, as in :func:`fedml.federated.client.client_update`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedml.data.interactions import UserItems
from fedml.flower.node_data import inventory_content, load_user_items, partition

if TYPE_CHECKING:
    import torch

VECTORS = "fedml-user-vectors"

app = ClientApp()


def node_data(context: Context) -> tuple[UserItems, np.ndarray]:
    """The node's data file and the shoppers (global indices) it holds, from the node config."""
    config = context.node_config
    if "data-file" not in config:
        raise ValueError("node config has no 'data-file' (flower-supernode --node-config \"data-file='...'\")")
    data = load_user_items(str(config["data-file"]))
    clients = partition(data.n_users, int(config.get("partition-id", 0)), int(config.get("num-partitions", 1)))
    return data, clients


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which shoppers this node holds and how many examples each has."""
    data, clients = node_data(context)
    counts = np.asarray(data.counts())[clients]
    clients, counts = clients[counts > 0], counts[counts > 0]  # a row without data is nobody's device
    return Message(inventory_content(clients, counts, data.n_users, data.n_items), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run :func:`client_update` for each requested shopper; reply with their row deltas only."""
    # torch only here: Flower starts a fresh process per message, and a query needs none of it
    from fedml.federated.client import client_update
    from fedml.federated.randomness import draw_round
    from fedml.flower.protocol import read_train_request, updates_content
    from fedml.threads import single_thread

    request = read_train_request(msg.content)
    data, held = node_data(context)
    foreign = sorted(set(request.clients) - set(held.tolist()))
    if foreign:
        raise ValueError(f"asked to train shoppers {foreign[:5]} that this node does not hold")
    clients = sorted(request.clients)
    positives = [data.of(c) for c in clients]
    local, table = request.local, request.table
    vectors = _load_vectors(context)
    updates = []
    with single_thread():
        draws = draw_round(
            request.seed, request.round, clients, positives, table.n_items, local.epochs, local.negatives
        )
        for client, pos, draw in zip(clients, positives, draws):
            update, vectors[client] = client_update(table, pos, vectors.get(client), local, draw)
            updates.append(update)
    _store_vectors(context, vectors)
    return Message(updates_content(clients, updates, table.dim), reply_to=msg)


def _load_vectors(context: Context) -> dict[int, torch.Tensor]:
    import torch

    if VECTORS not in context.state:
        return {}
    record = context.state[VECTORS]
    clients, values = record["clients"].numpy(), torch.from_numpy(record["vectors"].numpy().copy())
    return {int(c): values[i] for i, c in enumerate(clients)}


def _store_vectors(context: Context, vectors: dict[int, torch.Tensor]) -> None:
    import torch

    clients = sorted(vectors)
    values = torch.stack([vectors[c] for c in clients]).detach().cpu().numpy()
    context.state[VECTORS] = ArrayRecord(
        {"clients": Array(np.asarray(clients, dtype=np.int64)), "vectors": Array(values)}
    )
