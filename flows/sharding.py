"""Run a federated round's shards as Prefect tasks, on a Dask cluster when asked.

``federated.task_runner = "dask"`` sends each shard (a slice of the round's clients, with the item
table and the clients' own data) to Prefect's ``DaskTaskRunner``: a local cluster of worker
processes by default, or the scheduler at ``federated.dask_address``. The server step (summing the
shards' partial sums, DP noise) stays in the flow.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from prefect import task
from prefect.cache_policies import NO_CACHE

from fedml.config import RunConfig
from fedml.federated.rounds import Shard, ShardResult, ShardRunner, run_in_process, run_shard


@task(name="train-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=1)
def train_shard(shard: Shard) -> ShardResult:
    """Local training of one shard's clients and the partial sum of their scaled deltas."""
    return run_shard(shard)


class TaskRunnerShards:
    """A :data:`fedml.federated.rounds.ShardRunner` that submits shards to a Prefect task runner."""

    def __init__(self, task_runner) -> None:
        self.task_runner = task_runner

    def __call__(self, shards: Sequence[Shard]) -> list[ShardResult]:
        futures = [self.task_runner.submit(train_shard, {"shard": shard}) for shard in shards]
        return [future.result() for future in futures]


@contextmanager
def shard_runner(config: RunConfig) -> Iterator[ShardRunner]:
    """The shard runner the configuration asks for, started for the duration of the block."""
    federated = config.federated
    if federated.task_runner != "dask":
        yield run_in_process
        return
    from prefect_dask import DaskTaskRunner

    if federated.dask_address:
        runner = DaskTaskRunner(address=federated.dask_address)
    else:
        workers = max(1, min(federated.shards, 4))
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": None})  # fmt: skip
    with runner:
        yield TaskRunnerShards(runner)
