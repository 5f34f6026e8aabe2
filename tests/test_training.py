"""fedml.training: the configuration decides the mechanism, and each mechanism states its privacy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fedml.config import load_config
from fedml.data.ids import IdMap
from fedml.data.split import leave_last_out
from fedml.privacy.accountant import gaussian_epsilon
from fedml.privacy.dpsgd import poisson_schedule
from fedml.training import apply_local_dp, planned_spend, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def ratings_frame(n_users: int = 60, n_items: int = 40, per_user: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for t, i in enumerate(rng.choice(n_items, per_user, replace=False)):
            rows.append((f"u{u}", f"i{i}", "rating", float(rng.integers(1, 6)), 1_000_000 + t))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event", "rating", "timestamp"])


def test_central_dp_sgd_states_a_record_level_epsilon_from_the_accountant() -> None:
    frame = ratings_frame()
    ids = IdMap.from_frame(frame)
    split = leave_last_out(frame, ids)
    config = load_config(None, [
        "training.mode=central", "privacy.dp_sgd.enabled=true", "privacy.dp_sgd.epochs=2",
        "privacy.dp_sgd.batch_size=64", "privacy.dp_sgd.noise_multiplier=1.1", "model.dim=8",
    ])  # fmt: skip
    planned = planned_spend(split.train, config, None)
    outcome = train_model(split.train, config)
    statement = outcome.headline
    assert statement is not None and statement.unit == "record"
    # the ledger's plan, made before training, is what training then spends
    charge = planned.charge
    assert planned.unit == "record"
    assert (charge.noise_multiplier, charge.sample_rate, charge.steps) == (
        statement.noise_multiplier,
        statement.sample_rate,
        statement.steps,
    )
    q, steps = poisson_schedule(split.train.nnz, 64, 2)
    assert statement.epsilon == pytest.approx(gaussian_epsilon(1.1, q, steps, config.privacy.delta), rel=1e-9)
    assert outcome.table.n_items == ids.n_items and len(outcome.epoch_losses) == 2


def test_central_without_dp_has_no_privacy_statement() -> None:
    frame = ratings_frame()
    split = leave_last_out(frame, IdMap.from_frame(frame))
    config = load_config(None, ["training.mode=central", "privacy.dp_sgd.epochs=1", "model.dim=8"])
    assert train_model(split.train, config).headline is None


def test_local_dp_composes_both_mechanisms_and_flips_bits_at_the_stated_rate() -> None:
    frame = ratings_frame(n_users=200, n_items=50)
    ids = IdMap.from_frame(frame)
    split = leave_last_out(frame, ids)
    config = load_config(None, ["privacy.local_dp.enabled=true", "privacy.local_dp.implicit_epsilon=2.0",
                                "privacy.local_dp.rating_epsilon=1.0"])  # fmt: skip
    noisy, statement = apply_local_dp(split.train_frame, ids, config, seed=3)
    assert statement.epsilon == pytest.approx(3.0) and statement.delta == 0.0 and statement.unit == "record"
    flip = 1 / (1 + math.exp(2.0))
    true_bits = split.train.nnz
    all_bits = ids.n_users * ids.n_items
    expected = true_bits * (1 - flip) + (all_bits - true_bits) * flip
    std = math.sqrt(all_bits * flip * (1 - flip))
    assert abs(noisy.nnz - expected) < 5 * std
    # randomized response keeps most true bits: the noisy data still carries each shopper's signal
    kept = sum(len(np.intersect1d(noisy.of(u), split.train.of(u))) for u in range(ids.n_users))
    assert kept / true_bits == pytest.approx(1 - flip, abs=0.03)


def test_planned_spend_for_each_mechanism() -> None:
    frame = ratings_frame()
    split = leave_last_out(frame, IdMap.from_frame(frame))
    fedavg = planned_spend(split.train, load_config(None, ["federated.rounds=7", "federated.client_rate=0.3"]), None)
    assert fedavg.unit == "user"
    assert (fedavg.charge.noise_multiplier, fedavg.charge.sample_rate, fedavg.charge.steps) == (1.0, 0.3, 7)
    calibrated = load_config(None, ["training.mode=central", "privacy.dp_sgd.enabled=true",
                                    "privacy.dp_sgd.target_epsilon=2.0", "privacy.dp_sgd.batch_size=64"])  # fmt: skip
    plan = planned_spend(split.train, calibrated, None)
    eps = gaussian_epsilon(plan.charge.noise_multiplier, plan.charge.sample_rate, plan.charge.steps, 1e-5)
    assert 1.98 <= eps <= 2.0
    no_dp = load_config(None, ["privacy.dp_fedavg.enabled=false"])
    assert planned_spend(split.train, no_dp, None).charge.noise_multiplier == 0.0  # an infinite charge
    local = load_config(None, ["privacy.dp_fedavg.enabled=false", "privacy.local_dp.enabled=true"])
    _, statement = apply_local_dp(split.train_frame, IdMap.from_frame(frame), local, seed=1)
    plan = planned_spend(split.train, local, statement)
    assert plan.unit == "record" and plan.charge.pure_epsilon == statement.epsilon


def test_secure_noise_flag_reaches_dp_fedavg_and_local_dp() -> None:
    frame = ratings_frame()
    ids = IdMap.from_frame(frame)
    split = leave_last_out(frame, ids)
    base = ["federated.rounds=2", "federated.client_rate=0.5", "model.dim=8"]
    seeded = [train_model(split.train, load_config(None, base)) for _ in range(2)]
    secure = [train_model(split.train, load_config(None, [*base, "privacy.secure_noise=true"])) for _ in range(2)]
    assert seeded[0].table.embeddings.equal(seeded[1].table.embeddings)  # seeded: reproducible
    assert not secure[0].table.embeddings.equal(secure[1].table.embeddings)  # secure: fresh OS randomness
    assert secure[0].headline.epsilon == seeded[0].headline.epsilon  # same mechanism, same guarantee
    local = load_config(None, ["privacy.local_dp.enabled=true", "privacy.secure_noise=true"])
    first, _ = apply_local_dp(split.train_frame, ids, local, seed=1)
    second, _ = apply_local_dp(split.train_frame, ids, local, seed=1)
    assert not (np.array_equal(first.items, second.items) and np.array_equal(first.indptr, second.indptr))
