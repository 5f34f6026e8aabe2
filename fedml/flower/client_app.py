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
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fedml.data.interactions import UserItems
from fedml.flower.node_data import inventory_content, load_user_items, partition

if TYPE_CHECKING:
    import torch

    from fedml.federated.client import ClientUpdate, LocalTraining
    from fedml.models.mf import ItemTable

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
    """Run :func:`client_update` for each requested shopper; reply with their row deltas only.

    Under secure aggregation (the message carries SecAgg+'s stage record), Flower's
    ``secaggplus_mod`` runs the protocol's stages and calls :func:`secure_train` in the one that
    collects the masked uploads.
    """
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, secure_train)
    from fedml.flower.protocol import read_train_request, updates_content

    request = read_train_request(msg.content)
    clients = sorted(request.clients)
    updates = _train_shoppers(context, request.table, request.local, request.seed, request.round, clients)
    return Message(updates_content(clients, updates, request.table.dim), reply_to=msg)


def secure_train(msg: Message, context: Context) -> Message:
    """SecAgg+'s collect stage: train the requested shoppers, clip and weigh each update on the device,
    and hand the dense sum to ``secaggplus_mod`` (which quantises and masks it)."""
    from fedml.flower.secagg import device_upload, fit_res, read_fit_ins

    request = read_fit_ins(compat.recorddict_to_fitins(msg.content, keep_input=True))
    table = request.table
    clients = sorted(request.clients)
    updates = _train_shoppers(context, table, request.local, request.seed, request.round, clients)
    upload = device_upload(updates, request.clip_norm, request.weight_cap, table.n_items, table.dim)
    return Message(compat.fitres_to_recorddict(fit_res(upload), keep_input=False), reply_to=msg)


def _train_shoppers(
    context: Context, table: ItemTable, local: LocalTraining, seed: int, round_index: int, clients: list[int]
) -> list[ClientUpdate]:
    """:func:`client_update` for each of ``clients`` (held by this node), with their stored user vectors."""
    # torch only here: Flower starts a fresh process per message, and a query needs none of it
    from fedml.federated.client import client_update
    from fedml.federated.randomness import draw_round
    from fedml.threads import single_thread

    data, held = node_data(context)
    foreign = sorted(set(clients) - set(held.tolist()))
    if foreign:
        raise ValueError(f"asked to train shoppers {foreign[:5]} that this node does not hold")
    positives = [data.of(c) for c in clients]
    vectors = _load_vectors(context)
    updates = []
    with single_thread():
        draws = draw_round(seed, round_index, clients, positives, table.n_items, local.epochs, local.negatives)
        for client, pos, draw in zip(clients, positives, draws):
            update, vectors[client] = client_update(table, pos, vectors.get(client), local, draw)
            updates.append(update)
    if vectors:
        _store_vectors(context, vectors)
    return updates


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
