"""The pipeline's federated stage through a Flower deployment on this machine (``federated.engine = "flower"``).

A :class:`~fedml.flower.local.LocalFederation` (SuperLink and ``federated.flower_supernodes``
SuperNodes as processes on 127.0.0.1, TLS with certificates made for the run) trains on the run's
shoppers, split into contiguous blocks, one per SuperNode. It returns what
:func:`fedml.training.train_model` returns for a federated run, so the flow logs the same metrics,
epsilon and model. Flower runs do not checkpoint: a killed run starts again from round 1.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedml.config import RunConfig
from fedml.data.interactions import UserItems
from fedml.federated.rounds import RoundReport
from fedml.flower.commands import round_report
from fedml.flower.local import LocalFederation
from fedml.flower.setup import check_flower_config
from fedml.models.mf import init_item_table
from fedml.privacy.audit import CanarySet, canary_initial_table, strip_canaries
from fedml.privacy.statement import PrivacyStatement
from fedml.training import TrainingOutcome, audit_canaries


def train_with_flower(
    data: UserItems,
    config: RunConfig,
    *,
    canaries: CanarySet | None = None,
    local_statement: PrivacyStatement | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    workdir: str | Path | None = None,
) -> TrainingOutcome:
    """Federated training as :func:`fedml.training.train_model` does it, over Flower processes.

    ``on_round`` sees each round's :class:`~fedml.flower.server_app.FlowerRoundReport` as the round ends.
    """
    check_flower_config(config)
    init = init_item_table(data.n_items, config.model.dim, config.model.init_scale, config.training.seed)
    if canaries is not None:
        init = canary_initial_table(init, canaries)

    def on_event(event: dict) -> None:
        if event["event"] == "round" and on_round is not None:
            on_round(round_report(event))

    with LocalFederation(data, nodes=config.federated.flower_supernodes, workdir=workdir) as federation:
        assert federation.workdir is not None
        init_file = federation.workdir / "init.npz"
        np.savez(init_file, **init.to_numpy())
        run = federation.run(
            config,
            init_file=str(init_file),
            round_timeout_s=config.federated.flower_round_timeout_s,
            on_event=on_event,
        )
    table, audit = run.table, None
    if canaries is not None:
        audit = audit_canaries(init, table, canaries, run.statement, config)
        table = strip_canaries(table, canaries)
    return TrainingOutcome(table, run.statement, local_statement, list(run.reports), [], audit)
