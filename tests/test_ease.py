"""Federated EASE (fedml.models.ease): the federated Gram table gives the centralised EASE weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedml.config import load_config
from fedml.data.ids import IdMap
from fedml.evaluation.ranking import evaluate_ranking, popularity_scorer
from fedml.federated.client import LocalTraining, client_update, gram_update
from fedml.federated.randomness import draw_round
from fedml.models.ease import ease_weights, gram_rows
from fedml.models.mf import init_item_table
from fedml.privacy.accountant import SubsampledGaussianAccountant
from fedml.serving.recommender import Recommender
from fedml.training import train_model
from tests.clustered_shop import clustered_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EASE = ["model.kind=ease", "privacy.dp_fedavg.enabled=false", "privacy.audit.enabled=false"]


def reference_ease(gram: np.ndarray, l2: float) -> np.ndarray:
    """Steck's closed form written out in numpy, with the absolute lambda: B[i, j] = -P[i, j] / P[j, j]."""
    p = np.linalg.inv(gram + l2 * np.eye(len(gram)))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def dense(data) -> np.ndarray:
    x = np.zeros((data.n_users, data.n_items))
    x[data.users(), data.items] = 1.0
    return x


def test_a_device_uploads_its_own_co_occurrences() -> None:
    update = gram_update(np.array([7, 2, 5]), n_items=10)
    assert update.rows.tolist() == [2, 5, 7]
    expected = np.zeros((3, 10))
    expected[:, [2, 5, 7]] = 1 / 3
    np.testing.assert_allclose(update.delta_embeddings.numpy(), expected)
    np.testing.assert_allclose(update.delta_bias.numpy(), [1 / 3] * 3)
    assert update.num_examples == 3
    assert update.norm() == pytest.approx(math.sqrt(1 + 1 / 3))


def test_client_update_of_an_ease_device_trains_nothing_and_keeps_its_vector() -> None:
    table = init_item_table(10, 10, 0.1, seed=0)
    local = LocalTraining(epochs=1, lr=0.1, batch_size=4, negatives=2, l2=0.0, model="ease")
    positives = np.array([1, 4])
    draws = draw_round(0, 1, [0], [positives], 10, 1, 2)[0]
    update, vector = client_update(table, positives, None, local, draws)
    assert update.rows.tolist() == [1, 4] and torch.equal(vector, torch.zeros(10))
    rows, block, _ = gram_rows(positives, 10)
    assert torch.equal(update.delta_embeddings, block)


@pytest.mark.parametrize("engine", ["reference", "batched"])
def test_federated_ease_equals_centralised_ease(engine: str) -> None:
    data, _ = clustered_shop(n_users=60, n_items=24, clusters=3, per_user=5)
    l2 = 2.0
    x = dense(data)
    expected = reference_ease(x.T @ x, l2 * np.diag(x.T @ x).mean())
    # three rounds, every shopper each round, server rate 0.7: the table holds 2.1 times the mean Gram matrix
    config = load_config(None, [*EASE, f"model.ease_l2={l2}", "federated.rounds=3", "federated.client_rate=1.0",
                                "federated.server_lr=0.7", f"federated.engine={engine}"])  # fmt: skip
    federated = train_model(data, config).table
    central = train_model(data, load_config(None, [*EASE, f"model.ease_l2={l2}", "training.mode=central"])).table
    for table in (federated, central):
        np.testing.assert_allclose(table.embeddings.T.double().numpy(), expected, atol=1e-5)
        assert torch.count_nonzero(table.bias) == 0


def test_ease_with_dp_fedavg_normalises_each_shopper_and_states_epsilon() -> None:
    """Without noise, DP-FedAvg's weights (1 here) and clip make the table sum_u x_u^T x_u / n_u (times S / norm)."""
    data, _ = clustered_shop(n_users=40, n_items=16, clusters=2, per_user=4)
    config = load_config(None, [
        "model.kind=ease", "model.ease_l2=1.0", "privacy.audit.enabled=false", "federated.rounds=2",
        "federated.client_rate=1.0", "federated.server_lr=1.0", "privacy.dp_fedavg.enabled=true",
        "privacy.dp_fedavg.noise_multiplier=0.0", "privacy.dp_fedavg.clip_norm=0.5", "privacy.dp_fedavg.weight_cap=1.0",
    ])  # fmt: skip
    outcome = train_model(data, config)
    x = dense(data)
    normalised = x.T @ (x / x.sum(1, keepdims=True))  # every shopper has 4 items: clipped by the same factor
    expected = reference_ease(normalised, np.diag(normalised).mean())
    np.testing.assert_allclose(outcome.table.embeddings.T.double().numpy(), expected, atol=1e-5)
    assert all(report.clipped_fraction == 1.0 for report in outcome.rounds)
    statement = outcome.central
    assert statement is not None and statement.steps == 2


def test_ease_with_noise_states_the_accountants_epsilon() -> None:
    data, _ = clustered_shop(n_users=40, n_items=16, clusters=2, per_user=4)
    config = load_config(None, ["model.kind=ease", "privacy.audit.enabled=false", "federated.rounds=1",
                                "federated.client_rate=0.5", "federated.server_lr=1.0",
                                "privacy.dp_fedavg.noise_multiplier=2.0"])  # fmt: skip
    statement = train_model(data, config).central
    accountant = SubsampledGaussianAccountant(2.0, 0.5, "rdp")
    accountant.step()
    assert statement is not None and statement.epsilon == pytest.approx(accountant.epsilon(config.privacy.delta))


def test_recommender_scores_histories_with_the_item_weights_and_survives_save(tmp_path) -> None:
    data, test = clustered_shop(n_users=90, n_items=30, clusters=3, per_user=6)
    table = train_model(data, load_config(None, [*EASE, "federated.rounds=1", "federated.client_rate=1.0"])).table
    ids = IdMap(users=[f"u{u}" for u in range(data.n_users)], items=[f"i{i}" for i in range(data.n_items)])
    assert table.kind == "ease"
    recommender = Recommender(table=table, ids=ids)
    histories = [data.of(u) for u in range(3)]
    x = np.zeros((3, data.n_items))
    for row, history in enumerate(histories):
        x[row, history] = 1.0
    expected = x @ table.embeddings.T.double().numpy()
    np.testing.assert_allclose(recommender.score(histories).double().numpy(), expected, atol=1e-5)
    loaded = Recommender.load(recommender.save(tmp_path / "model"))
    assert loaded.table.kind == "ease"
    torch.testing.assert_close(loaded.score(histories), recommender.score(histories))
    # the clustered structure is learnt: far better than popularity at finding the held-out item
    scorer = lambda users, hs: recommender.score(hs)  # noqa: E731
    ease_hr = evaluate_ranking(scorer, data, test, k=5).hit_rate
    assert ease_hr > evaluate_ranking(popularity_scorer(data), data, test, k=5).hit_rate + 0.2


def test_ease_rejects_adam_and_dp_sgd() -> None:
    data, _ = clustered_shop(n_users=20, n_items=12, clusters=2, per_user=3)
    with pytest.raises(ValueError, match="server_optimizer"):
        train_model(data, load_config(None, [*EASE, "federated.server_optimizer=adam"]))
    with pytest.raises(ValueError, match="dp_sgd"):
        train_model(data, load_config(None, [*EASE, "training.mode=central", "privacy.dp_sgd.enabled=true"]))
    with pytest.raises(ValueError, match="ease_l2"):
        ease_weights(torch.eye(3), 0.0)


def test_the_canary_audit_reads_an_ease_run_and_stays_below_the_claim() -> None:
    """Canaries (one dedicated item each) raise their item's count in the Gram table: the audit sees them
    through the table's bias, finds a positive lower bound that the accountant's epsilon covers, and
    the published table holds the real catalogue only."""
    from fedml.training import plant_audit_canaries

    data, _ = clustered_shop(n_users=40, n_items=16, clusters=2, per_user=4)
    config = load_config(None, [
        "model.kind=ease", "federated.rounds=1", "federated.client_rate=1.0", "federated.server_lr=1.0",
        "privacy.dp_fedavg.noise_multiplier=0.3", "privacy.dp_fedavg.clip_norm=1.0",
        "privacy.dp_fedavg.weight_cap=1.0", "privacy.audit.canaries=200",
    ])  # fmt: skip
    planted, canaries = plant_audit_canaries(data, config)
    outcome = train_model(planted, config, canaries=canaries)
    assert outcome.table.kind == "ease" and outcome.table.n_items == data.n_items
    assert outcome.audit is not None and outcome.central is not None
    assert 0 < outcome.audit.epsilon_lower_bound <= outcome.central.epsilon
