"""Engine benchmark contender: Flower's simulation engine running our own client update.

The same work as :func:`fedml.federated.rounds.train_federated` (:func:`client_update` on each
sampled shopper, FedAvg over the touched-row deltas, server step ``server_lr``), but moved through
Flower 1.32: a ``ServerApp`` round loop on the ``Grid`` and one virtual SuperNode per shopper
(``partition-id`` = shopper index) whose ``ClientApp`` runs in a Ray actor. Comparing its timings
with our own loops compares engines, not models.

How the pieces talk:

* **Server** (a thread of this process, so it closes over this call's state): every round it
  samples ``clients_per_round`` node ids without replacement (seeded), sends each the global item
  table as an ``ArrayRecord`` plus a ``ConfigRecord`` (the local hyper-parameters, seed, round and
  the data file), and rebuilds :class:`ClientUpdate` objects from the replies for
  :class:`fedml.federated.aggregation.FedAvg`.
* **Clients** run in Ray actor processes, which do not see this process's globals: the shoppers'
  positives are written once to an ``.npz`` in a temp dir whose path travels in the message config,
  and each actor loads it lazily (cached per path). A client computes its own random draws from
  (seed, round, partition-id) with :func:`fedml.federated.randomness.draw_round`, exactly the draws
  every other engine gives that shopper in that round, and replies with its touched rows and their
  deltas (``rows``, ``delta_embeddings``, ``delta_bias``) and ``num-examples``.

Which shoppers a seed selects differs between runs: Flower gives nodes random ids, and the server
samples among node ids (it never learns the node to partition mapping without an extra round trip).
Given a selection, the round's result is the one the in-process engines compute for the same
clients (up to float64 summation order).

``run_simulation`` is deprecated in favour of ``flwr run``, but it is the in-process entry point
and a fair way to time the engine itself.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

# Read by flwr at import time (telemetry) or by Ray at start-up: set before either is imported.
for _key, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}.items():
    os.environ.setdefault(_key, _value)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedml.data.interactions import UserItems  # noqa: E402
from fedml.federated.aggregation import FedAvg  # noqa: E402
from fedml.federated.client import ClientUpdate, LocalTraining, client_update  # noqa: E402
from fedml.federated.randomness import draw_round  # noqa: E402
from fedml.models.mf import ItemTable  # noqa: E402
from fedml.threads import single_thread  # noqa: E402

PROJECT_ROOT = str(Path(__file__).resolve().parents[1])
DATA_FILE = "user_items.npz"
PULL_INTERVAL_S = 0.1  # InMemoryGrid.send_and_receive's default: keep the engine's own polling rate
MAX_ATTEMPTS = 2  # Ray start-up can time out once on a small machine: retry only a failed start


@dataclass
class FlowerResult:
    """The trained table and where the wall time went (seconds, ``time.time`` based)."""

    table: ItemTable
    seconds_total: float  # the whole run_simulation call of the successful attempt
    seconds_startup: float | None  # run_simulation called -> the first ClientApp starts running
    seconds_per_round: list[float]  # round 1 from its first client start; later rounds end to end
    client_updates: int
    seconds_client_compute: float = 0.0  # summed over clients: draw_round + client_update
    seconds_shutdown: float = 0.0  # last round aggregated -> run_simulation returned (Ray teardown)
    attempts: int = 1
    sampled_partitions: list[list[int]] = field(default_factory=list)  # per round, sorted


# ---------------------------------------------------------------------------------------------
# ClientApp: module level, so Ray actors import it by reference (bench must be importable there).

client_app = ClientApp()


@lru_cache(maxsize=4)
def _load_user_items(path: str) -> UserItems:
    with np.load(path) as z:
        return UserItems(indptr=z["indptr"], items=z["items"], n_users=int(z["n_users"]), n_items=int(z["n_items"]))


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    started = time.time()
    config = msg.content["config"]
    arrays = msg.content["arrays"]
    partition = int(context.node_config["partition-id"])
    local = LocalTraining(**{name: config[name] for name in LocalTraining.__dataclass_fields__})
    data = _load_user_items(str(config["data-path"]))
    table = ItemTable(
        torch.from_numpy(arrays["item_embeddings"].numpy()), torch.from_numpy(arrays["item_bias"].numpy())
    )
    positives = data.of(partition)
    compute_started = time.perf_counter()
    with single_thread():
        draws = draw_round(
            int(config["seed"]), int(config["round"]), [partition], [positives], table.n_items, local.epochs,
            local.negatives,
        )[0]  # fmt: skip
        update, _ = client_update(table, positives, None, local, draws)
    compute = time.perf_counter() - compute_started
    reply = RecordDict(
        {
            "arrays": ArrayRecord(
                {
                    "rows": Array(update.rows.cpu().numpy().astype(np.int64)),
                    "delta_embeddings": Array(update.delta_embeddings.cpu().numpy()),
                    "delta_bias": Array(update.delta_bias.cpu().numpy()),
                }
            ),
            "metrics": MetricRecord(
                {
                    "num-examples": update.num_examples,
                    "loss": float(update.loss),
                    "partition-id": partition,
                    "started-at": started,
                    "compute-seconds": compute,
                }
            ),
        }
    )
    return Message(reply, reply_to=msg)


# ---------------------------------------------------------------------------------------------
# Server side


class _Aborted(RuntimeError):
    pass


@dataclass
class _ServerState:
    """What the ServerApp thread leaves behind for the caller."""

    table: ItemTable
    round_ends: list[float] = field(default_factory=list)
    first_client_start: float | None = None
    any_reply: bool = False
    client_updates: int = 0
    client_compute: float = 0.0
    sampled: list[list[int]] = field(default_factory=list)


def _make_server_app(
    state: _ServerState,
    abort: threading.Event,
    *,
    n_nodes: int,
    rounds: int,
    clients_per_round: int,
    server_lr: float,
    seed: int,
    local: LocalTraining,
    data_path: str,
) -> ServerApp:
    app = ServerApp()
    aggregator = FedAvg()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        nodes = _wait_for_nodes(grid, n_nodes, abort)
        rng = np.random.default_rng(seed)
        table = state.table
        for round_index in range(1, rounds + 1):
            chosen = [nodes[i] for i in rng.choice(len(nodes), size=clients_per_round, replace=False)]
            arrays = table.to_numpy()
            messages = [
                Message(
                    RecordDict(
                        {
                            "arrays": ArrayRecord({name: Array(value) for name, value in arrays.items()}),
                            "config": ConfigRecord(
                                {**asdict(local), "seed": seed, "round": round_index, "data-path": data_path}
                            ),
                        }
                    ),
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=str(round_index),
                )
                for node in chosen
            ]
            replies = _send_and_receive(grid, messages, abort, state)
            updates, partitions = [], []
            for reply in replies:
                if reply.has_error():
                    raise RuntimeError(f"ClientApp failed in round {round_index}: {reply.error.reason}")
                metrics, record = reply.content["metrics"], reply.content["arrays"]
                updates.append(
                    ClientUpdate(
                        rows=torch.from_numpy(record["rows"].numpy()),
                        delta_embeddings=torch.from_numpy(record["delta_embeddings"].numpy()),
                        delta_bias=torch.from_numpy(record["delta_bias"].numpy()),
                        num_examples=int(metrics["num-examples"]),
                        loss=float(metrics["loss"]),
                    )
                )
                partitions.append(int(metrics["partition-id"]))
                state.client_compute += float(metrics["compute-seconds"])
                if round_index == 1:
                    started = float(metrics["started-at"])
                    state.first_client_start = min(started, state.first_client_start or started)
            if len(updates) != clients_per_round:
                raise RuntimeError(f"round {round_index}: {len(updates)} replies for {clients_per_round} messages")
            aggregate = aggregator.aggregate(updates, table.n_items, table.dim)
            table.embeddings += server_lr * aggregate.delta_embeddings.to(table.embeddings.dtype)
            table.bias += server_lr * aggregate.delta_bias.to(table.bias.dtype)
            state.client_updates += len(updates)
            state.sampled.append(sorted(partitions))
            state.round_ends.append(time.time())

    return app


def _wait_for_nodes(grid: Grid, n_nodes: int, abort: threading.Event) -> list[int]:
    """The ServerApp thread starts before the engine registers its SuperNodes: wait for all."""
    while len(nodes := sorted(grid.get_node_ids())) < n_nodes:
        if abort.wait(0.01):
            raise _Aborted("simulation aborted before the SuperNodes registered")
    return nodes


def _send_and_receive(
    grid: Grid, messages: list[Message], abort: threading.Event, state: _ServerState
) -> list[Message]:
    """``grid.send_and_receive`` without a timeout, but giving up when the engine has died.

    If Ray fails to start, ``run_simulation`` raises in the caller's thread while the ServerApp
    thread would wait for replies forever (and, not being a daemon, keep the process alive).
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    while pending:
        got = list(grid.pull_messages(pending))
        if got:
            state.any_reply = True
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if pending and abort.wait(PULL_INTERVAL_S):
            raise _Aborted("simulation aborted while waiting for ClientApp replies")
    return replies


# ---------------------------------------------------------------------------------------------


def run_flower_simulation(
    data: UserItems,
    init: ItemTable,
    local: LocalTraining,
    *,
    rounds: int,
    clients_per_round: int,
    server_lr: float,
    seed: int,
    num_cpus_per_client: float = 1.0,
) -> FlowerResult:
    """Train with Flower's simulation engine (Ray backend), one SuperNode per shopper.

    Each round samples ``clients_per_round`` SuperNodes, runs :func:`client_update` on each (fresh
    fold-in user vector, draws of ``(seed, round, partition-id)``) and applies the FedAvg of their deltas
    with ``server_lr``. ``num_cpus_per_client`` sets Ray's resources per ClientApp actor, hence how
    many run at once. A run whose engine fails before any client replied (Ray start-up timeout) is
    retried once.
    """
    if not 0 < clients_per_round <= data.n_users:
        raise ValueError(f"clients_per_round must be in [1, {data.n_users}], got {clients_per_round}")
    from flwr.simulation import run_simulation  # noqa: PLC0415 (heavy; only needed here)

    workdir = tempfile.mkdtemp(prefix="fedml-flower-")
    data_path = os.path.join(workdir, DATA_FILE)
    np.savez(data_path, indptr=data.indptr, items=data.items, n_users=data.n_users, n_items=data.n_items)
    saved_env = {key: os.environ.get(key) for key in ("FLWR_HOME", "PYTHONPATH")}
    os.environ.setdefault("FLWR_HOME", os.path.join(workdir, "flwr-home"))
    added_path = PROJECT_ROOT not in sys.path
    if added_path:  # the RayBackend hands the driver's sys.path to the actors as PYTHONPATH
        sys.path.append(PROJECT_ROOT)
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        for attempt in range(1, MAX_ATTEMPTS + 1):
            state = _ServerState(table=init.to("cpu").clone())
            abort = threading.Event()
            server_app = _make_server_app(
                state,
                abort,
                n_nodes=data.n_users,
                rounds=rounds,
                clients_per_round=clients_per_round,
                server_lr=server_lr,
                seed=seed,
                local=local,
                data_path=data_path,
            )
            started = time.time()
            try:
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=data.n_users,
                    backend_config={"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}},
                )
            except Exception:
                abort.set()
                _shutdown_ray()
                if state.any_reply or attempt == MAX_ATTEMPTS:
                    raise
                logging.getLogger(__name__).warning("Flower simulation failed to start; retrying once")
                continue
            finally:
                abort.set()  # frees a ServerApp thread still waiting on a dead engine
                os.environ["PYTHONPATH"] = saved_env["PYTHONPATH"] or ""  # flwr prepends sys.path
                if saved_env["PYTHONPATH"] is None:
                    del os.environ["PYTHONPATH"]
            finished = time.time()
            break
        _shutdown_ray()
    finally:
        flwr_logger.setLevel(saved_level)
        if added_path:
            sys.path.remove(PROJECT_ROOT)
        if saved_env["FLWR_HOME"] is None:
            os.environ.pop("FLWR_HOME", None)
        shutil.rmtree(workdir, ignore_errors=True)

    if len(state.round_ends) != rounds:
        raise RuntimeError(f"the ServerApp finished {len(state.round_ends)} of {rounds} rounds")
    first = state.first_client_start
    boundaries = [first if first is not None else started, *state.round_ends]
    return FlowerResult(
        table=state.table,
        seconds_total=finished - started,
        seconds_startup=(first - started) if first is not None else None,
        seconds_per_round=[b - a for a, b in zip(boundaries[:-1], boundaries[1:])],
        client_updates=state.client_updates,
        seconds_client_compute=state.client_compute,
        seconds_shutdown=finished - state.round_ends[-1],
        attempts=attempt,
        sampled_partitions=state.sampled,
    )


def _shutdown_ray() -> None:
    import ray  # noqa: PLC0415

    if ray.is_initialized():
        ray.shutdown()
