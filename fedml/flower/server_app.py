"""The ServerApp: our server side of federated training, over Flower's Grid.

Per round, as :func:`fedml.federated.rounds.train_federated` does it: Poisson-sample shoppers with the
run's seed, send each SuperNode that holds sampled shoppers the global table and their indices, turn
the replies into :class:`~fedml.federated.client.ClientUpdate` objects in the simulator's order,
``accumulate`` and ``finish`` them with our aggregator (DP-FedAvg: clipping, capped weights, Gaussian
noise once on the sum, fixed denominator), step the server optimiser and the accountant.

Failure handling: a round waits at most ``round-timeout-s`` for replies. Shoppers on nodes that are
offline, fail or time out are *sampled but not answered*; the round goes on with the others. The
accountant still advances once per round with the planned rate q (see ``docs/flower.md``).

Run config (``[tool.flwr.app.config]`` of the app written by :mod:`fedml.flower.app_project`):
``fedml-config`` (a :class:`~fedml.config.RunConfig` as JSON), ``output-dir`` (where ``events.jsonl``,
``model.npz`` and ``summary.json`` go, on the SuperLink's machine), ``init-file`` (optional initial
table), ``min-nodes``, ``node-wait-s``, ``round-timeout-s``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedml.config import RunConfig
from fedml.federated.client import ClientUpdate
from fedml.federated.rounds import RoundReport
from fedml.federated.sampling import poisson_sample
from fedml.flower.node_data import read_inventory
from fedml.flower.protocol import read_updates, train_content
from fedml.flower.secagg import MIN_NODES, SecureSum, fit_ins, quantization_error_bound, secure_round
from fedml.flower.setup import FederatedSetup, federated_setup, privacy_statement
from fedml.models.mf import ItemTable, init_item_table

EVENTS_FILE = "events.jsonl"
MODEL_FILE = "model.npz"
SUMMARY_FILE = "summary.json"
POLL_S = 0.2

app = ServerApp()


@dataclass
class FlowerRoundReport(RoundReport):
    """A round's record, with how many sampled shoppers (with data) the round asked and heard from."""

    clients_sampled: int = 0
    clients_answered: int = 0


@dataclass(frozen=True)
class ServerSettings:
    config: RunConfig
    output_dir: Path
    init_file: str
    min_nodes: int
    node_wait_s: float
    round_timeout_s: float

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> ServerSettings:
        missing = [k for k in ("fedml-config", "output-dir") if not run_config.get(k)]
        if missing:
            raise ValueError(f"run config lacks {missing} (write the app with fedml.flower.app_project)")
        return cls(
            config=RunConfig.from_dict(json.loads(str(run_config["fedml-config"]))),
            output_dir=Path(str(run_config["output-dir"])),
            init_file=str(run_config.get("init-file", "")),
            min_nodes=int(run_config.get("min-nodes", 1)),
            node_wait_s=float(run_config.get("node-wait-s", 120.0)),
            round_timeout_s=float(run_config.get("round-timeout-s", 300.0)),
        )


class EventLog:
    """JSON lines the caller can follow while the run goes (one object per line, flushed)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path

    def write(self, event: str, **fields: Any) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    settings = ServerSettings.from_run_config(context.run_config)
    events = EventLog(settings.output_dir / EVENTS_FILE)
    try:
        serve(grid, context, settings, events)
    except Exception as error:
        events.write("failed", error=f"{type(error).__name__}: {error}")
        raise


def serve(grid: Grid, context: Context, settings: ServerSettings, events: EventLog) -> None:
    """Query the nodes, run the configured rounds, write the model and the summary."""
    config = settings.config
    secure = config.federated.secure_aggregation
    nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait_s)
    if secure and len(nodes) < MIN_NODES:
        raise ValueError(f"federated.secure_aggregation needs at least {MIN_NODES} SuperNodes, {len(nodes)} connected")
    owner, counts, n_items = take_inventory(grid, nodes, settings.round_timeout_s)
    setup = federated_setup(config, counts)
    events.write("started", nodes=len(nodes), shoppers=len(counts), items=n_items, secure_aggregation=secure)
    if settings.init_file:
        with np.load(settings.init_file) as arrays:
            table = ItemTable.from_numpy(dict(arrays))
        if table.n_items != n_items or table.dim != config.model.dim:
            raise ValueError(
                f"init-file {settings.init_file}: a table of {table.n_items} items x {table.dim}, "
                f"the nodes hold {n_items} items and model.dim is {config.model.dim}"
            )
    else:
        table = init_item_table(n_items, config.model.dim, config.model.init_scale, config.training.seed)
    rng = np.random.default_rng(config.training.seed)
    fed = config.federated
    for round_index in range(1, fed.rounds + 1):
        started = time.perf_counter()
        drawn = poisson_sample(len(counts), fed.client_rate, rng)
        sampled = drawn[counts[drawn] > 0]
        events.write("round_started", round=round_index, clients_sampled=len(sampled))
        secagg: dict[str, Any] = {}
        if secure:
            result = secure_train_round(
                grid, context, table, setup, config, round_index, sampled, owner, counts, settings.round_timeout_s
            )
            partials, answered_clients, loss = result.partials, result.answered, result.loss
            if result.params is not None:
                secagg = {**asdict(result.params), "error_bound": quantization_error_bound(
                    result.params.nodes, result.params.clipping_range, result.params.quantization_range)}  # fmt: skip
        else:
            answered = train_round(grid, table, setup, config, round_index, sampled, owner, settings.round_timeout_s)
            updates = [answered[c] for c in sampled.tolist() if c in answered]  # the simulator's order
            partials = [setup.aggregator.accumulate(updates, table.n_items, table.dim)]
            answered_clients = list(answered)
            loss = float(np.mean([u.loss for u in updates])) if updates else float("nan")
        aggregate = setup.aggregator.finish(partials, table.n_items, table.dim)
        setup.optimizer.step(table, aggregate.delta_embeddings, aggregate.delta_bias)
        epsilon = None
        if setup.accountant is not None:
            setup.accountant.step()  # the planned q: see docs/flower.md on dropouts
            epsilon = setup.accountant.epsilon(config.privacy.delta)
        report = FlowerRoundReport(
            round=round_index,
            clients=aggregate.num_clients,
            examples=aggregate.num_examples,
            loss=loss,
            update_norm=aggregate.mean_update_norm,
            clipped_fraction=aggregate.clipped_fraction,
            epsilon=epsilon,
            seconds=time.perf_counter() - started,
            clients_sampled=len(sampled),
            clients_answered=len(answered_clients),
        )
        missing = sorted(set(sampled.tolist()) - set(answered_clients))
        events.write("round", **asdict(report), missing=missing, **({"secagg": secagg} if secure else {}))
    out = settings.output_dir
    np.savez(out / MODEL_FILE, **table.to_numpy())
    statement = privacy_statement(setup, config)
    summary = {
        "rounds": fed.rounds,
        "statement": asdict(statement) if statement else None,
        "secure_aggregation": secure,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    events.write("finished", epsilon=statement.epsilon if statement else None)


def wait_for_nodes(grid: Grid, min_nodes: int, timeout_s: float) -> list[int]:
    """The connected SuperNodes, once at least ``min_nodes`` are (a clear error after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while len(nodes := sorted(grid.get_node_ids())) < min_nodes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} SuperNodes connected after {timeout_s:.0f} s, min-nodes is {min_nodes}")
        time.sleep(POLL_S)
    return nodes


def take_inventory(grid: Grid, nodes: list[int], timeout_s: float) -> tuple[dict[int, int], np.ndarray, int]:
    """Ask every node which shoppers it holds: (shopper -> node, every shopper's count, n_items).

    Shoppers no node holds count 0 (never trained, as a shopper without data in the simulator).
    """
    messages = [grid.create_message(RecordDict(), MessageType.QUERY, node, "inventory") for node in nodes]
    owner: dict[int, int] = {}
    sizes: set[tuple[int, int]] = set()
    held: list[tuple[np.ndarray, np.ndarray]] = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            continue  # a node that cannot say what it holds takes no part
        inventory = read_inventory(reply.content)
        sizes.add((inventory.n_users, inventory.n_items))
        for client in inventory.clients.tolist():
            if client in owner:
                raise ValueError(f"shopper {client} is held by two SuperNodes (check their partition-id)")
            owner[client] = reply.metadata.src_node_id
        held.append((inventory.clients, inventory.counts))
    if len(sizes) != 1:
        raise ValueError(f"SuperNodes disagree on the data set's size (n_users, n_items): {sorted(sizes)}")
    n_users, n_items = sizes.pop()
    counts = np.zeros(n_users, dtype=np.int64)
    for clients, client_counts in held:
        counts[clients] = client_counts
    return owner, counts, n_items


def shoppers_by_node(grid: Grid, sampled: np.ndarray, owner: dict[int, int]) -> dict[int, list[int]]:
    """The sampled shoppers of each online node (shoppers on offline nodes are left out: they cannot answer)."""
    online = set(grid.get_node_ids())
    by_node: dict[int, list[int]] = {}
    for client in sampled.tolist():
        node = owner.get(client)
        if node in online:
            by_node.setdefault(node, []).append(client)
    return by_node


def train_round(
    grid: Grid,
    table: ItemTable,
    setup: FederatedSetup,
    config: RunConfig,
    round_index: int,
    sampled: np.ndarray,
    owner: dict[int, int],
    timeout_s: float,
) -> dict[int, ClientUpdate]:
    """Send each online node its sampled shoppers; the uploads that came back within ``timeout_s``."""
    by_node = shoppers_by_node(grid, sampled, owner)
    messages = [
        grid.create_message(
            train_content(table, setup.local, config.training.seed, round_index, clients),
            MessageType.TRAIN,
            node,
            str(round_index),
        )
        for node, clients in by_node.items()
    ]
    answered: dict[int, ClientUpdate] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s) if messages else []:
        if reply.has_error():
            continue  # node gone or ClientApp failed: its shoppers did not answer
        answered.update(read_updates(reply.content))
    return answered


def secure_train_round(
    grid: Grid,
    context: Context,
    table: ItemTable,
    setup: FederatedSetup,
    config: RunConfig,
    round_index: int,
    sampled: np.ndarray,
    owner: dict[int, int],
    counts: np.ndarray,
    timeout_s: float,
) -> SecureSum:
    """One round through SecAgg+: the online nodes holding sampled shoppers, padded with idle online
    nodes (they upload zeros) up to :data:`MIN_NODES`; the server gets only the sum."""
    by_node = shoppers_by_node(grid, sampled, owner)
    for node in sorted(grid.get_node_ids()):
        if len(by_node) >= MIN_NODES:
            break
        by_node.setdefault(node, [])
    dp = config.privacy.dp_fedavg
    instructions = {
        node: fit_ins(table, setup.local, config.training.seed, round_index, clients, dp.clip_norm, dp.weight_cap)
        for node, clients in by_node.items()
    }
    return secure_round(grid, context, instructions, by_node, counts, dp.clip_norm, round_index, timeout_s)
