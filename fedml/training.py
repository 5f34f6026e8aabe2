"""Train the recommender as a run configuration says: federated or central, with its privacy.

This is the library's single entry point for training; the Prefect flow calls it and records what
it returns. Every privacy mechanism the run applies yields a :class:`PrivacyStatement`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedml.config import ConfigError, RunConfig
from fedml.data.ids import IdMap
from fedml.data.interactions import UserItems
from fedml.data.schema import EVENT, ITEM, RATING, USER
from fedml.data.split import positive_mask
from fedml.federated.aggregation import DPFedAvg
from fedml.federated.client import LocalTraining
from fedml.federated.robust import check_dp_compatible, federated_aggregator
from fedml.federated.rounds import Aggregator, Checkpointer, RoundReport, ShardRunner, run_in_process, train_federated
from fedml.federated.server_optim import ServerOptimizer, server_optimizer
from fedml.models.ease import KIND as EASE
from fedml.models.ease import ease_table, gram_of, init_gram_table
from fedml.models.mf import ItemTable, init_item_table
from fedml.privacy.accountant import SubsampledGaussianAccountant, calibrate_noise_multiplier
from fedml.privacy.audit import (
    AuditResult,
    CanarySet,
    audit,
    canary_initial_table,
    planned_guesses,
    plant_canaries,
    score_canaries,
    strip_canaries,
)
from fedml.privacy.ledger import Charge
from fedml.privacy.local_dp import (
    laplace_ratings,
    laplace_statement,
    randomized_response,
    randomized_response_statement,
)
from fedml.privacy.report import SECURE_AGGREGATION
from fedml.privacy.secure_noise import SecureNoise
from fedml.privacy.statement import PrivacyStatement, compose_pure

RATING_RANGE = (1.0, 5.0)


@dataclass
class TrainingOutcome:
    """The trained global model and the privacy it cost."""

    table: ItemTable
    central: PrivacyStatement | None  # user-level DP-FedAvg or record-level DP-SGD
    local: PrivacyStatement | None  # local DP applied to the raw data before training
    rounds: list[RoundReport] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    audit: AuditResult | None = None  # the empirical audit of the central mechanism, when it ran

    @property
    def headline(self) -> PrivacyStatement | None:
        """The guarantee the gate checks: the central mechanism's, else the local one's."""
        return self.central or self.local


def apply_local_dp(
    train_frame: pd.DataFrame, ids: IdMap, config: RunConfig, seed: int
) -> tuple[UserItems, PrivacyStatement]:
    """Noise each shopper's training data as their device would before sharing it.

    Ratings get discrete Laplace noise (they then decide which ratings count as positives), and
    every (shopper, item) presence bit goes through randomized response. Both are pure-epsilon per
    record; they compose by addition on the same record.
    """
    rng = SecureNoise() if config.privacy.secure_noise else np.random.default_rng(seed)
    ldp = config.privacy.local_dp
    frame = train_frame.copy()
    statements = []
    is_rating = (frame[EVENT] == "rating").to_numpy()
    if is_rating.any():
        ratings = frame[RATING].to_numpy(dtype=np.float64, copy=True)
        ratings[is_rating] = laplace_ratings(ratings[is_rating], ldp.rating_epsilon, *RATING_RANGE, rng, resolution=1.0)
        frame[RATING] = ratings
        statements.append(laplace_statement(ldp.rating_epsilon))
    keep = positive_mask(frame, config.data.min_positive_rating or None)
    positives = UserItems.from_pairs(
        ids.user_index(frame.loc[keep, USER]), ids.item_index(frame.loc[keep, ITEM]), ids.n_users, ids.n_items
    )
    noisy = randomized_response(positives, ldp.implicit_epsilon, rng)
    statements.append(randomized_response_statement(ldp.implicit_epsilon))
    return noisy, compose_pure(statements) if len(statements) > 1 else statements[0]


@dataclass(frozen=True)
class PlannedSpend:
    """What a run will spend, known before it trains: the unit protected and the charge."""

    unit: str
    charge: Charge


FEDAVG_MECHANISM = "dp-fedavg (clipped client updates, gaussian noise on the sum, fixed denominator)"
FEDAVG_SECAGG_MECHANISM = (
    f"dp-fedavg ({SECURE_AGGREGATION}; capped weights, gaussian noise on the sum, fixed denominator)"
)


def planned_spend(data: UserItems, config: RunConfig, local_statement: PrivacyStatement | None) -> PlannedSpend:
    """The privacy the run's headline mechanism will spend, for the ledger's check before training.

    DP-FedAvg: (σ, q, rounds) per user. DP-SGD: (σ, q, steps) per record, with σ calibrated as
    training will calibrate it. Local DP alone: its pure ε per record. No DP at all: σ = 0, an
    infinite charge (a run without DP voids any budget of the shoppers it touches).
    """
    fed, privacy = config.federated, config.privacy
    if config.training.mode == "federated":
        if privacy.dp_fedavg.enabled:
            return PlannedSpend("user", Charge(fedavg_mechanism(config), privacy.dp_fedavg.noise_multiplier,
                                               fed.client_rate, fed.rounds))  # fmt: skip
    elif privacy.dp_sgd.enabled:
        from fedml.privacy.dpsgd import MECHANISM, poisson_schedule

        sgd = privacy.dp_sgd
        q, steps = poisson_schedule(data.nnz, sgd.batch_size, sgd.epochs)
        sigma = sgd.noise_multiplier
        if sgd.target_epsilon > 0:
            sigma = calibrate_noise_multiplier(sgd.target_epsilon, q, steps, privacy.delta, privacy.accountant)
        return PlannedSpend("record", Charge(MECHANISM, sigma, q, steps))
    if local_statement is not None:
        return PlannedSpend(
            local_statement.unit, Charge(local_statement.mechanism, pure_epsilon=local_statement.epsilon)
        )
    return PlannedSpend("user", Charge("none (no differential privacy)", 0.0, 1.0, 1))


def central_mechanism_enabled(config: RunConfig) -> bool:
    """Does the run use DP-FedAvg (federated) or DP-SGD (central)?"""
    if config.training.mode == "federated":
        return config.privacy.dp_fedavg.enabled
    return config.privacy.dp_sgd.enabled


def plant_audit_canaries(data: UserItems, config: RunConfig) -> tuple[UserItems, CanarySet | None]:
    """Add the empirical audit's canary shoppers and products to the training data, when configured.

    The audit checks the central mechanism, so it runs only with DP-FedAvg or DP-SGD. The draw of
    which canaries are in is seeded by ``privacy.audit.seed`` (the auditor's secret), so the ledger's
    plan made on the returned data is what training then spends.
    """
    settings = config.privacy.audit
    if not (settings.enabled and settings.canaries > 0 and central_mechanism_enabled(config)):
        return data, None
    return plant_canaries(data, settings.canaries, settings.seed, settings.items_per_canary)


def train_model(
    data: UserItems,
    config: RunConfig,
    *,
    canaries: CanarySet | None = None,
    local_statement: PrivacyStatement | None = None,
    shard_runner: ShardRunner = run_in_process,
    on_round: Callable[[RoundReport], None] | None = None,
    on_epoch: Callable[[int, float, float | None], None] | None = None,
    wrap_aggregator: Callable[[Aggregator], Aggregator] | None = None,
    checkpoints: Checkpointer | None = None,
    resume: Mapping[str, Any] | None = None,
) -> TrainingOutcome:
    """Train on ``data`` (one row per shopper) the way ``config.training.mode`` says.

    ``canaries`` (from :func:`plant_audit_canaries`, already in ``data``) are audited after training
    and stripped from the returned table, so the published model never holds a fake product.
    ``local_statement`` is the guarantee of local DP already applied to ``data``, if any;
    ``shard_runner`` runs the shards of a federated round (in process by default);
    ``wrap_aggregator`` wraps the federated aggregator (simulations: :mod:`fedml.federated.attacks`).
    Federated training saves its state to ``checkpoints`` after every round and continues from
    ``resume`` (such a state) when given; central training (DP-SGD) neither saves nor resumes.
    """
    ease = config.model.kind == EASE
    if ease:
        _check_ease(config)
        init = init_gram_table(data.n_items)
    else:
        init = init_item_table(data.n_items, config.model.dim, config.model.init_scale, config.training.seed)
    if canaries is not None:
        init = canary_initial_table(init, canaries)
    if config.training.mode == "central":
        table, central, rounds, losses = _train_central(data, init, config, on_epoch)
    else:
        table, central, rounds, losses = _train_federated(
            data, init, config, shard_runner, on_round, checkpoints, resume, wrap_aggregator=wrap_aggregator
        )
    result = None
    if canaries is not None:
        result = audit_canaries(init, table, canaries, central, config)
        table = strip_canaries(table, canaries)
    if ease:
        table = ease_table(table, config.model.ease_l2)
    return TrainingOutcome(table, central, local_statement, rounds, losses, result)


def audit_canaries(
    init: ItemTable, trained: ItemTable, canaries: CanarySet, claim: PrivacyStatement | None, config: RunConfig
) -> AuditResult:
    """The empirical audit of the central mechanism from the canaries' rows before and after training."""
    settings = config.privacy.audit
    guesses = None
    if settings.guesses == "planned":
        q = claim.sample_rate if claim and claim.sample_rate else config.federated.client_rate
        steps = claim.steps if claim and claim.steps else config.federated.rounds
        guesses = planned_guesses(canaries.m, 1 - (1 - q) ** steps)
    scores = score_canaries(init, trained, canaries)
    return audit(scores, canaries, config.privacy.delta, settings.confidence, guesses)


def _check_ease(config: RunConfig) -> None:
    """EASE's weights are a function of the accumulated Gram table: only linear server steps keep it one."""
    if config.training.mode == "federated" and config.federated.server_optimizer == "adam":
        raise ValueError("model.kind=ease needs federated.server_optimizer sgd or momentum (adam rescales rows)")
    if config.training.mode == "central" and config.privacy.dp_sgd.enabled:
        raise ValueError("model.kind=ease has no DP-SGD training: set privacy.dp_sgd.enabled=false")


def local_training(config: RunConfig) -> LocalTraining:
    """The devices' local training settings of a federated run."""
    fed = config.federated
    return LocalTraining(
        epochs=fed.local_epochs,
        lr=fed.local_lr,
        batch_size=fed.local_batch_size,
        negatives=fed.negatives,
        l2=config.model.l2,
        fold_in_l2=config.model.fold_in_l2,
        init_iterations=fed.client_init_iterations,
        model=config.model.kind,
    )


def build_aggregator(
    config: RunConfig,
    counts: np.ndarray,
    *,
    wrap: Callable[[Aggregator], Aggregator] | None = None,
) -> Aggregator:
    """The server's aggregator of a federated run, for a population with these per-shopper example counts.

    DP-FedAvg (clipping, capped weights, noise on the sum, fixed denominator q·W) when
    ``privacy.dp_fedavg.enabled``, else ``federated.aggregation`` (FedAvg or a robust one); ``wrap``
    wraps it (simulations: :mod:`fedml.federated.attacks`).
    """
    fed, dp, privacy = config.federated, config.privacy.dp_fedavg, config.privacy
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
    else:
        aggregator = federated_aggregator(fed.aggregation, fed.trim_fraction, fed.norm_bound)
    return wrap(aggregator) if wrap is not None else aggregator


def build_accountant(config: RunConfig) -> SubsampledGaussianAccountant | None:
    """The user-level accountant of a federated run (None without DP-FedAvg)."""
    fed, privacy = config.federated, config.privacy
    if not privacy.dp_fedavg.enabled:
        return None
    return SubsampledGaussianAccountant(privacy.dp_fedavg.noise_multiplier, fed.client_rate, privacy.accountant)


def build_server_optimizer(config: RunConfig) -> ServerOptimizer:
    """The server optimiser of a federated run (``federated.server_optimizer``)."""
    fed = config.federated
    return server_optimizer(
        fed.server_optimizer, fed.server_lr, beta1=fed.server_beta1, beta2=fed.server_beta2, tau=fed.server_tau
    )


def fedavg_mechanism(config: RunConfig) -> str:
    """How DP-FedAvg ran: with the server clipping each update, or under secure aggregation."""
    return FEDAVG_SECAGG_MECHANISM if config.federated.secure_aggregation else FEDAVG_MECHANISM


def federated_statement(accountant: SubsampledGaussianAccountant | None, config: RunConfig) -> PrivacyStatement | None:
    """The user-level guarantee after the rounds ``accountant`` accounted (None without DP-FedAvg)."""
    if accountant is None:
        return None
    fed, privacy = config.federated, config.privacy
    return PrivacyStatement(
        epsilon=accountant.epsilon(privacy.delta),
        delta=privacy.delta,
        unit="user",
        mechanism=fedavg_mechanism(config),
        accountant=f"{privacy.accountant} (opacus)",
        sampling=f"poisson q={fed.client_rate:g}",
        noise_multiplier=privacy.dp_fedavg.noise_multiplier,
        sample_rate=fed.client_rate,
        steps=accountant.steps,
    )


def _train_federated(
    data: UserItems,
    init: ItemTable,
    config: RunConfig,
    shard_runner: ShardRunner,
    on_round: Callable[[RoundReport], None] | None,
    checkpoints: Checkpointer | None = None,
    resume: Mapping[str, Any] | None = None,
    *,
    wrap_aggregator: Callable[[Aggregator], Aggregator] | None = None,
) -> tuple[ItemTable, PrivacyStatement | None, list[RoundReport], list[float]]:
    fed = config.federated
    if fed.secure_aggregation:
        raise ConfigError(
            "federated.secure_aggregation = true needs federated.engine = 'flower' (Flower's SecAgg+); "
            f"the {fed.engine!r} simulator aggregates in the clear"
        )
    accountant = build_accountant(config)
    run = train_federated(
        data,
        init,
        local_training(config),
        build_aggregator(config, data.counts(), wrap=wrap_aggregator),
        rounds=fed.rounds,
        client_rate=fed.client_rate,
        server_lr=fed.server_lr,
        seed=config.training.seed,
        accountant=accountant,
        delta=config.privacy.delta,
        device=config.training.device,
        engine=fed.engine,
        shards=fed.shards,
        shard_runner=shard_runner,
        on_round=on_round,
        server_optimizer=build_server_optimizer(config),
        checkpoints=checkpoints,
        resume=resume,
    )
    return run.table, federated_statement(accountant, config), run.reports, []


def _train_central(
    data: UserItems, init: ItemTable, config: RunConfig, on_epoch: Callable[[int, float, float | None], None] | None
) -> tuple[ItemTable, PrivacyStatement | None, list[RoundReport], list[float]]:
    if config.model.kind == EASE:  # the centralised reference: the exact Gram matrix of the pooled data
        return gram_of(data), None, [], []
    from fedml.privacy.dpsgd import train_central  # Opacus import only when used

    sgd, privacy = config.privacy.dp_sgd, config.privacy
    result = train_central(
        data,
        init,
        epochs=sgd.epochs,
        batch_size=sgd.batch_size,
        lr=sgd.lr,
        negatives=config.federated.negatives,
        l2=config.model.l2,
        seed=config.training.seed,
        private=sgd.enabled,
        noise_multiplier=sgd.noise_multiplier,
        max_grad_norm=sgd.max_grad_norm,
        target_epsilon=sgd.target_epsilon,
        delta=privacy.delta,
        accountant=privacy.accountant,
        progress=on_epoch,
        secure_noise=privacy.secure_noise,
    )
    return result.table, result.statement, [], list(result.losses)
