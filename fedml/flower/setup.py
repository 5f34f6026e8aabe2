"""The server side's pieces for a run configuration: local training, aggregator, accountant, optimiser."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedml.config import RunConfig
from fedml.federated.aggregation import DPFedAvg
from fedml.federated.client import LocalTraining
from fedml.federated.robust import check_dp_compatible, federated_aggregator
from fedml.federated.rounds import Aggregator
from fedml.federated.server_optim import ServerOptimizer, server_optimizer
from fedml.privacy.accountant import SubsampledGaussianAccountant
from fedml.privacy.secure_noise import SecureNoise
from fedml.privacy.statement import PrivacyStatement
from fedml.training import FEDAVG_MECHANISM


@dataclass
class FederatedSetup:
    local: LocalTraining
    aggregator: Aggregator  # DP-FedAvg, FedAvg or a robust aggregator (federated.aggregation)
    accountant: SubsampledGaussianAccountant | None
    optimizer: ServerOptimizer


def federated_setup(config: RunConfig, counts: np.ndarray) -> FederatedSetup:
    """What :func:`fedml.training.train_model` builds for a federated run, given every shopper's count."""
    fed, dp, privacy = config.federated, config.privacy.dp_fedavg, config.privacy
    local = LocalTraining(
        epochs=fed.local_epochs,
        lr=fed.local_lr,
        batch_size=fed.local_batch_size,
        negatives=fed.negatives,
        l2=config.model.l2,
        fold_in_l2=config.model.fold_in_l2,
        init_iterations=fed.client_init_iterations,
    )
    accountant = None
    if dp.enabled:
        check_dp_compatible(fed.aggregation, fed.norm_bound)
        aggregator: Aggregator = DPFedAvg.for_population(
            counts,
            fed.client_rate,
            clip_norm=dp.clip_norm,
            noise_multiplier=dp.noise_multiplier,
            weight_cap=dp.weight_cap,
            generator=SecureNoise()
            if privacy.secure_noise
            else torch.Generator().manual_seed(config.training.seed + 1),
        )
        accountant = SubsampledGaussianAccountant(dp.noise_multiplier, fed.client_rate, privacy.accountant)
    else:
        aggregator = federated_aggregator(fed.aggregation, fed.trim_fraction, fed.norm_bound)
    optimizer = server_optimizer(
        fed.server_optimizer, fed.server_lr, beta1=fed.server_beta1, beta2=fed.server_beta2, tau=fed.server_tau
    )
    return FederatedSetup(local, aggregator, accountant, optimizer)


def privacy_statement(setup: FederatedSetup, config: RunConfig) -> PrivacyStatement | None:
    """The run's user-level guarantee after the rounds it accounted (None without DP-FedAvg)."""
    if setup.accountant is None:
        return None
    fed, privacy = config.federated, config.privacy
    return PrivacyStatement(
        epsilon=setup.accountant.epsilon(privacy.delta),
        delta=privacy.delta,
        unit="user",
        mechanism=FEDAVG_MECHANISM,
        accountant=f"{privacy.accountant} (opacus)",
        sampling=f"poisson q={fed.client_rate:g}",
        noise_multiplier=config.privacy.dp_fedavg.noise_multiplier,
        sample_rate=fed.client_rate,
        steps=setup.accountant.steps,
    )
