"""The server side's pieces for a run configuration, built by :mod:`fedml.training`'s factories."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedml.config import ConfigError, RunConfig
from fedml.federated.client import LocalTraining
from fedml.federated.rounds import Aggregator
from fedml.federated.server_optim import ServerOptimizer
from fedml.privacy.accountant import SubsampledGaussianAccountant
from fedml.privacy.statement import PrivacyStatement
from fedml.training import (
    build_accountant,
    build_aggregator,
    build_server_optimizer,
    federated_statement,
    local_training,
)


@dataclass
class FederatedSetup:
    local: LocalTraining
    aggregator: Aggregator  # DP-FedAvg, FedAvg or a robust aggregator (federated.aggregation)
    accountant: SubsampledGaussianAccountant | None
    optimizer: ServerOptimizer


def check_flower_config(config: RunConfig) -> None:
    """What a Flower deployment cannot run, refused with the field to change."""
    if config.training.mode != "federated":
        raise ConfigError(f"the Flower engine trains federated runs only, not training.mode = {config.training.mode!r}")
    if config.model.kind != "mf":
        raise ConfigError(f"the Flower engine trains model.kind = 'mf' only, not {config.model.kind!r}")
    if config.federated.secure_aggregation and not config.privacy.dp_fedavg.enabled:
        raise ConfigError(
            "federated.secure_aggregation needs privacy.dp_fedavg.enabled = true: SecAgg+ sums bounded, "
            "device-clipped updates; plain FedAvg and the robust aggregators need each update in the clear"
        )


def federated_setup(config: RunConfig, counts: np.ndarray) -> FederatedSetup:
    """What :func:`fedml.training.train_model` builds for a federated run, given every shopper's count."""
    check_flower_config(config)
    return FederatedSetup(
        local_training(config),
        build_aggregator(config, counts),
        build_accountant(config),
        build_server_optimizer(config),
    )


def privacy_statement(setup: FederatedSetup, config: RunConfig) -> PrivacyStatement | None:
    """The run's user-level guarantee after the rounds it accounted (None without DP-FedAvg)."""
    return federated_statement(setup.accountant, config)
