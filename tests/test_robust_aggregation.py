"""Robust aggregation of sparse updates (fedml.federated.robust) and the simulated attacks (fedml.federated.attacks).

Closed forms on hand-made updates, FedAvg as the special case without trimming or norm bound, the
per-row guarantee under attack, and a poisoned run on the clustered test shop (300 shoppers, 60 items
in 3 clusters; see tests/test_rounds.py): 10% of each round's clients scaled x300 or sign-flipped x10
wreck FedAvg, while norm bounding plus the trimmed mean stays within 5% of the clean run's HR@10.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fedml.config import ConfigError, RunConfig, apply_override
from fedml.evaluation.ranking import evaluate_ranking
from fedml.federated.aggregation import FedAvg
from fedml.federated.attacks import PoisonedUploads
from fedml.federated.batched import batched_client_updates
from fedml.federated.client import ClientUpdate, LocalTraining
from fedml.federated.randomness import draw_round
from fedml.federated.robust import (
    GatheredUpdates,
    RobustFedAvg,
    check_dp_compatible,
    federated_aggregator,
    row_statistic,
)
from fedml.federated.rounds import train_federated
from fedml.models.mf import fold_in, init_item_table, score_all
from fedml.training import train_model
from tests.clustered_shop import clustered_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N_USERS, N_ITEMS, N_CLUSTERS, PER_USER, DIM = 300, 60, 3, 8, 8
LOCAL = LocalTraining(epochs=2, lr=0.5, batch_size=8, negatives=4, l2=1e-4)


def _update(rows: list[int], embeddings: list[list[float]], bias: list[float], n: int) -> ClientUpdate:
    return ClientUpdate(
        rows=torch.tensor(rows, dtype=torch.int64),
        delta_embeddings=torch.tensor(embeddings, dtype=torch.float64),
        delta_bias=torch.tensor(bias, dtype=torch.float64),
        num_examples=n,
        loss=0.0,
    )


def _one_row(values, weights, rule, trim=0.0) -> np.ndarray:
    x = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(len(values), -1))
    stat, total = row_statistic(torch.zeros(len(values), dtype=torch.int64), x, torch.as_tensor(weights), 1, rule, trim)
    assert float(total[0]) == pytest.approx(float(np.sum(weights)))
    return stat[0].numpy()


def test_trimmed_mean_and_median_closed_forms():
    # equal weights: cut 20% of 5 values = one from each end
    assert _one_row([1.0, 100.0, 3.0, 2.0, 4.0], [1, 1, 1, 1, 1], "trimmed_mean", 0.2) == pytest.approx(3.0)
    # weights [1, 2, 1] on values [0, 4, 10], W = 4: cutting 1/4 from each end leaves the 4
    assert _one_row([0.0, 4.0, 10.0], [1, 2, 1], "trimmed_mean", 0.25) == pytest.approx(4.0)
    # cutting 1/8 of W = 0.5 from each end: half of the 0 and half of the 10 stay: (0 * .5 + 4 * 2 + 10 * .5) / 3
    assert _one_row([0.0, 4.0, 10.0], [1, 2, 1], "trimmed_mean", 0.125) == pytest.approx(13 / 3)
    assert _one_row([0.0, 4.0, 10.0], [1, 2, 1], "trimmed_mean", 0.0) == pytest.approx(18 / 4)  # weighted mean
    assert _one_row([0.0, 4.0, 10.0], [1, 2, 1], "median") == pytest.approx(4.0)
    assert _one_row([0.0, 4.0, 10.0], [3, 2, 1], "median") == pytest.approx(2.0)  # weight splits at 0 | 4
    assert _one_row([1.0, 3.0], [1, 1], "median") == pytest.approx(2.0)


def test_equal_weights_agree_with_scipy_and_numpy_coordinatewise():
    rng = np.random.default_rng(0)
    for m in (5, 10, 11, 20):
        x = rng.standard_cauchy((m, 4))
        ones = np.ones(m)
        np.testing.assert_allclose(_one_row(x, ones, "median").ravel(), np.median(x, axis=0), rtol=1e-12)
        trim = 2 / m if m % 5 == 0 else 0.0  # trim * m whole: scipy's (and Flower's) trim_mean
        np.testing.assert_allclose(
            _one_row(x, ones, "trimmed_mean", trim).ravel(), stats.trim_mean(x, trim, axis=0), rtol=1e-10
        )
        # integer weights act as repeated values
        weights = rng.integers(1, 4, m)
        repeated = np.repeat(x, weights, axis=0)
        np.testing.assert_allclose(_one_row(x, weights, "median").ravel(), np.median(repeated, axis=0), rtol=1e-12)
        if len(repeated) % 10 == 0:
            np.testing.assert_allclose(
                _one_row(x, weights, "trimmed_mean", 0.1).ravel(),
                stats.trim_mean(repeated, 0.1, axis=0),
                rtol=1e-10,
            )


def test_sparse_rows_use_only_the_clients_that_touched_them():
    # client a (n=1) touches rows 0 and 2, b (n=1) row 0, c (n=2) rows 0 and 1; row 3 nobody
    a = _update([0, 2], [[1.0, 0.0], [5.0, 5.0]], [1.0, 2.0], 1)
    b = _update([0], [[3.0, 0.0]], [3.0], 1)
    c = _update([0, 1], [[100.0, 1.0], [7.0, -7.0]], [100.0, 4.0], 2)
    out = RobustFedAvg("median").aggregate([a, b, c], n_items=4, dim=2)
    total = 4.0
    # row 0: weights 1, 1, 2 on first coordinates 1, 3, 100 split in half between 3 and 100: (3 + 100) / 2;
    # on second coordinates 0, 0, 1 between 0 and 1: 1 / 2 (all its weight touched row 0: share 4 / 4)
    assert out.delta_embeddings[0].tolist() == pytest.approx([(3 + 100) / 2 * 4 / total, 0.5])
    assert float(out.delta_bias[0]) == pytest.approx((3 + 100) / 2)
    # rows 1 and 2 were touched by one client each: that client's value, times its share of the weight
    assert out.delta_embeddings[1].tolist() == pytest.approx([7.0 * 2 / total, -7.0 * 2 / total])
    assert out.delta_embeddings[2].tolist() == pytest.approx([5.0 / total, 5.0 / total])
    assert float(out.delta_bias[2]) == pytest.approx(2.0 / total)
    assert out.delta_embeddings[3].tolist() == [0.0, 0.0] and float(out.delta_bias[3]) == 0.0
    assert (out.num_clients, out.num_examples, out.clipped_fraction) == (3, 4, 0.0)


def test_norm_bound_clips_to_a_multiple_of_the_median_norm():
    updates = [_update([0], [[3.0, 4.0]], [0.0], 1), _update([0], [[0.0, 1.0]], [0.0], 1),
               _update([1], [[0.0, 0.0]], [2.0], 1), _update([1], [[0.0, 600.0]], [800.0], 1)]  # fmt: skip
    norms = [5.0, 1.0, 2.0, 1000.0]  # median 3.5
    out = RobustFedAvg("trimmed_mean", 0.0, norm_bound=1.0).aggregate(updates, n_items=2, dim=2)
    assert out.extra["norm_bound"] == pytest.approx(3.5)
    assert out.clipped_fraction == pytest.approx(0.5) and out.mean_update_norm == pytest.approx(np.mean(norms))
    # row 0: (3, 4 | 0) scaled to norm 3.5 and (0, 1 | 0) as it is; row 1: (0, 0 | 2) as it is and
    # (0, 600 | 800) scaled to norm 3.5; each row's sum over the round's 4 examples
    s0, s1 = 3.5 / 5, 3.5 / 1000
    assert out.delta_embeddings[0].tolist() == pytest.approx([3 * s0 / 4, (4 * s0 + 1) / 4])
    assert out.delta_embeddings[1].tolist() == pytest.approx([0.0, 600 * s1 / 4])
    assert out.delta_bias.tolist() == pytest.approx([0.0, (2 + 800 * s1) / 4])
    loose = RobustFedAvg("trimmed_mean", 0.0, norm_bound=2.0).aggregate(updates, n_items=2, dim=2)
    assert loose.clipped_fraction == pytest.approx(0.25)  # only the norm above 2 x 3.5


def test_attackers_below_the_trimmed_weight_cannot_leave_the_honest_range():
    rng = np.random.default_rng(1)
    for _ in range(50):
        honest, attackers, dim, trim = int(rng.integers(8, 30)), int(rng.integers(1, 4)), 3, 0.2
        w_honest = rng.integers(1, 5, honest).astype(np.float64)
        w_attack = rng.integers(1, 5, attackers).astype(np.float64)
        if w_attack.sum() >= trim * (w_honest.sum() + w_attack.sum()):
            continue  # the guarantee needs the attackers' weight below trim * W
        x_honest = rng.normal(size=(honest, dim))
        x_attack = rng.choice([-1e6, 1e6], size=(attackers, dim)) * rng.uniform(0.5, 2.0, (attackers, dim))
        for rule in ("trimmed_mean", "median"):
            got = _one_row(np.vstack([x_honest, x_attack]), np.concatenate([w_honest, w_attack]), rule, trim)
            assert np.all(got >= x_honest.min(axis=0) - 1e-12) and np.all(got <= x_honest.max(axis=0) + 1e-12)


@pytest.fixture(scope="module")
def shop():
    return clustered_shop(N_USERS, N_ITEMS, N_CLUSTERS, PER_USER)


@pytest.fixture(scope="module")
def round_batch(shop):
    """One round's real uploads (80 clients of the clustered shop, batched engine)."""
    data, _ = shop
    clients = list(range(0, 240, 3))
    positives = [data.of(c) for c in clients]
    table = init_item_table(N_ITEMS, DIM, 0.1, seed=0)
    draws = draw_round(0, 1, clients, positives, N_ITEMS, LOCAL.epochs, LOCAL.negatives)
    batch, _ = batched_client_updates(table, positives, [None] * len(clients), LOCAL, draws)
    return batch


def test_without_trimming_or_bound_it_is_fedavg(round_batch):
    fedavg = FedAvg().aggregate_batched(round_batch, N_ITEMS, DIM)
    for robust in (RobustFedAvg("trimmed_mean", 0.0), federated_aggregator("trimmed_mean", 0.0, 0.0)):
        for got in (robust.aggregate_batched(round_batch, N_ITEMS, DIM),
                    robust.aggregate(round_batch.clients(), N_ITEMS, DIM)):  # fmt: skip
            torch.testing.assert_close(got.delta_embeddings, fedavg.delta_embeddings, rtol=1e-10, atol=1e-15)
            torch.testing.assert_close(got.delta_bias, fedavg.delta_bias, rtol=1e-10, atol=1e-15)
            assert (got.num_clients, got.num_examples) == (fedavg.num_clients, fedavg.num_examples)
    assert isinstance(federated_aggregator("fedavg", 0.2, 0.0), FedAvg)
    # trimming does change a real round (its rows' values are not all alike)
    trimmed = RobustFedAvg("trimmed_mean", 0.2).aggregate_batched(round_batch, N_ITEMS, DIM)
    assert not torch.allclose(trimmed.delta_embeddings, fedavg.delta_embeddings)


def test_shards_gather_to_the_same_round(round_batch):
    robust = RobustFedAvg("trimmed_mean", 0.1, norm_bound=1.0)
    clients = round_batch.clients()
    whole = robust.aggregate(clients, N_ITEMS, DIM)
    # the batched path agrees up to its float32 row norms (relative 1e-7: the clipping factors)
    batched = robust.aggregate_batched(round_batch, N_ITEMS, DIM)
    torch.testing.assert_close(batched.delta_embeddings, whole.delta_embeddings, rtol=1e-5, atol=1e-12)
    parts = [robust.accumulate(clients[lo:hi], N_ITEMS, DIM) for lo, hi in ((0, 25), (25, 26), (26, 80))]
    assert all(isinstance(p, GatheredUpdates) for p in parts)
    sharded = robust.finish(parts, N_ITEMS, DIM)
    torch.testing.assert_close(sharded.delta_embeddings, whole.delta_embeddings, rtol=1e-10, atol=1e-15)
    torch.testing.assert_close(sharded.delta_bias, whole.delta_bias, rtol=1e-10, atol=1e-15)
    assert sharded.clipped_fraction == whole.clipped_fraction > 0
    with pytest.raises(TypeError, match="GatheredUpdates"):
        robust.finish([FedAvg().accumulate(clients, N_ITEMS, DIM)], N_ITEMS, DIM)


def test_attack_poisons_a_seeded_tenth_of_the_uploads(round_batch):
    class Keep:
        def accumulate(self, updates, *args, **kwargs):
            return updates

        def accumulate_batched(self, batch, *args, **kwargs):
            return batch.clients()

    clean = round_batch.clients()
    for kind, multiplier in (("scale", 30.0), ("sign_flip", -30.0)):
        batched, single = (
            PoisonedUploads(Keep(), kind, 0.1, 30.0, seed=5),
            PoisonedUploads(Keep(), kind, 0.1, 30.0, seed=5),
        )
        got_batched = batched.accumulate_batched(round_batch, N_ITEMS, DIM)
        got_single = single.accumulate(clean, N_ITEMS, DIM)
        picked = batched.history[0]
        assert len(picked) == 8 and np.array_equal(picked, single.history[0])  # same seed, same picks
        for i, (before, a, b) in enumerate(zip(clean, got_batched, got_single)):
            expected = multiplier if i in set(picked.tolist()) else 1.0
            for got in (a, b):
                torch.testing.assert_close(got.delta_embeddings, before.delta_embeddings * expected)
                torch.testing.assert_close(got.delta_bias, before.delta_bias * expected)
                assert got.num_examples == before.num_examples and torch.equal(got.rows, before.rows)
        assert not np.array_equal(batched.attackers(len(clean)), picked)  # the next call picks afresh
    with pytest.raises(ValueError, match="kind"):
        PoisonedUploads(Keep(), "noise", 0.1)  # type: ignore[arg-type]


def _hit_rate(shop, aggregator) -> float:
    data, test_items = shop
    run = train_federated(data, init_item_table(N_ITEMS, DIM, 0.1, seed=0), LOCAL, aggregator, rounds=20,
                          client_rate=0.5, server_lr=10.0, seed=0)  # fmt: skip
    table = run.table

    def scorer(users, histories):
        return score_all(table, fold_in(table, histories, negatives=LOCAL.negatives, l2=1.0))

    return evaluate_ranking(scorer, data, test_items, k=10).hit_rate


def test_poisoned_clients_wreck_fedavg_but_not_the_defence(shop):
    """Measured: clean 0.83; FedAvg scaled x300 0.25, sign-flipped x10 0.20; defended 0.82, 0.82, 0.83."""
    clean = _hit_rate(shop, FedAvg())
    assert clean > 0.6  # the run learns the clusters (popularity: ~0.18)

    def defence():
        return RobustFedAvg("trimmed_mean", trim_fraction=0.1, norm_bound=1.0)

    assert _hit_rate(shop, defence()) >= 0.95 * clean
    for kind, factor in (("scale", 300.0), ("sign_flip", 10.0)):
        assert _hit_rate(shop, PoisonedUploads(FedAvg(), kind, 0.1, factor, seed=1)) < 0.5 * clean
        assert _hit_rate(shop, PoisonedUploads(defence(), kind, 0.1, factor, seed=1)) >= 0.95 * clean


def test_config_builds_the_aggregator_and_refuses_robust_rules_with_dp(shop):
    config = RunConfig()
    assert config.federated.aggregation == "fedavg" and config.federated.norm_bound == 0.0
    for override in ("federated.aggregation=median", "federated.norm_bound=2"):
        config = RunConfig()
        apply_override(config, override)
        assert config.privacy.dp_fedavg.enabled
        with pytest.raises(ConfigError, match="privacy.dp_fedavg.enabled"):
            train_model(shop[0], config)
    check_dp_compatible("fedavg", 0.0)  # plain DP-FedAvg is fine
    with pytest.raises(ConfigError, match="federated.aggregation"):
        apply_override(RunConfig(), "federated.aggregation=krum")
    with pytest.raises(ConfigError, match="federated.trim_fraction"):
        federated_aggregator("trimmed_mean", 0.5, 0.0)
    assert federated_aggregator("median", 0.1, 1.5) == RobustFedAvg("median", 0.1, 1.5)
    assert federated_aggregator("fedavg", 0.1, 1.5) == RobustFedAvg("trimmed_mean", 0.0, 1.5)  # clipped FedAvg

    # a robust run through the configuration, without DP, trains and reports its clipping
    config = RunConfig()
    for override in ("privacy.dp_fedavg.enabled=false", "privacy.audit.enabled=false", "federated.rounds=2",
                     "federated.aggregation=trimmed_mean", "federated.norm_bound=1", "model.dim=8",
                     "federated.server_lr=10"):  # fmt: skip
        apply_override(config, override)
    outcome = train_model(shop[0], config)
    assert len(outcome.rounds) == 2 and outcome.central is None
    assert all(0.3 < r.clipped_fraction < 0.7 for r in outcome.rounds)  # about half are above the median norm
