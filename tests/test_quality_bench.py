"""The quality benchmark's EASE reference and configuration files (the full run is `make bench-quality`)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.quality import DATASETS, _describe, ease_scorer
from fedml.config import apply_override, load_config
from fedml.evaluation.ranking import evaluate_ranking, popularity_scorer
from tests.clustered_shop import clustered_shop


def _clustered(n_users: int = 120, n_items: int = 30, clusters: int = 3, per_user: int = 6):
    return clustered_shop(n_users, n_items, clusters, per_user)


def test_ease_learns_item_to_item_similarity():
    train, test = _clustered()
    scorer = ease_scorer(train, l2=10.0)
    scores = scorer(np.array([0, 1]), [train.of(0), train.of(1)]).numpy()
    assert scores.shape == (2, train.n_items)
    in_cluster = np.arange(train.n_items) // 10 == 0
    assert scores[0, in_cluster].mean() > scores[0, ~in_cluster].mean()  # shopper 0 is in cluster 0
    ease = evaluate_ranking(scorer, train, test, k=5)
    popularity = evaluate_ranking(popularity_scorer(train), train, test, k=5)
    assert ease.hit_rate > popularity.hit_rate + 0.3


def test_ease_zero_diagonal_and_stronger_l2_shrinks():
    train, _ = _clustered()
    histories = [train.of(0)]
    weak, strong = (ease_scorer(train, l2)(np.array([0]), histories).numpy() for l2 in (1.0, 1000.0))
    assert np.abs(strong).sum() < np.abs(weak).sum()


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_configs_load_and_describe(name):
    config = load_config(DATASETS[name])
    assert config.data.source == name and not config.privacy.dp_fedavg.enabled
    assert "federated, no DP" in _describe(config)
    apply_override(config, "training.mode=central")
    assert "central SGD, no DP" in _describe(config)
