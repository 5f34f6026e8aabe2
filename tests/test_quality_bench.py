"""The quality benchmark's EASE reference and configuration files (the full run is `make bench-quality`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench.quality import DATASETS, NON_PRIVATE, _describe, ease_scorer
from fedml.config import apply_override, load_config
from fedml.evaluation.ranking import evaluate_ranking, popularity_scorer
from tests.clustered_shop import clustered_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    config = load_config(DATASETS[name], NON_PRIVATE)
    assert config.data.source == name and not config.privacy.dp_fedavg.enabled
    assert "federated, no DP" in _describe(config)
    apply_override(config, "privacy.dp_fedavg.enabled=true")
    assert "federated, DP-FedAvg clip" in _describe(config)
    apply_override(config, "training.mode=central")
    assert "central SGD, no DP" in _describe(config)


# ---------------------------------------------------------------- the privacy-utility sweep

TINY = ["data.n_items=120", "data.n_categories=6", "federated.rounds=2", "privacy.dp_sgd.epochs=1",
        "privacy.dp_sgd.batch_size=256", "evaluation.sampled_negatives=20"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_sweep():
    from bench.quality import open_bench, run_dataset

    bench = open_bench("synthetic", TINY, quick=True, synthetic_shoppers=400)
    return bench, run_dataset(bench, (8.0,))


@pytest.mark.parametrize("n", [1, 9, 10, 943, 1000, 100_000, 3_000_000])
def test_delta_is_below_one_over_the_shoppers(n):
    from bench.quality import delta_for

    delta = delta_for(n)
    assert delta <= 1e-5 and delta <= 0.1 / n
    assert delta == 1e-5 or delta > 0.01 / n  # the largest such power of ten
    assert math.log10(delta) == round(math.log10(delta))  # a power of ten


def test_sweep_privacy_facts_come_from_the_accountant(tiny_sweep):
    from fedml.privacy.accountant import gaussian_epsilon

    bench, result = tiny_sweep
    assert result["shoppers"] == bench.ids.n_users == 400 and result["delta"] == 1e-5
    points = {p["mechanism"]: p for p in result["sweep"]}
    assert set(points) == {"dp-fedavg", "dp-sgd", "local-dp"}
    for mechanism in ("dp-fedavg", "dp-sgd"):
        p = points[mechanism]
        recomputed = gaussian_epsilon(p["noise_multiplier"], p["sample_rate"], p["steps"], p["delta"], "rdp")
        assert p["epsilon"] == pytest.approx(recomputed)
        assert 7.8 <= p["epsilon"] <= 8.0 and p["delta"] == 1e-5 and p["accountant"].startswith("rdp")
    assert points["dp-fedavg"]["unit"] == "user" and points["dp-sgd"]["unit"] == "record"
    assert points["dp-fedavg"]["steps"] == 2 and points["dp-fedavg"]["sample_rate"] == 0.1
    ldp = points["local-dp"]
    assert ldp["epsilon"] == 8.0 and ldp["delta"] == 0.0 and ldp["accountant"] == "pure-epsilon"
    assert ldp["noisy_positives"] != ldp["true_positives"]  # randomized response changed the data


def test_every_figure_carries_its_protocol(tiny_sweep):
    _, result = tiny_sweep
    entries = list(result["models"].values()) + result["sweep"]
    assert set(result["models"]) == {"federated", "central", "ease", "popularity"}
    for entry in entries:
        assert 0.0 <= entry["hr_at_10"] <= 1.0 and entry["recall_at_10"] == entry["hr_at_10"]
        assert entry["protocol_details"]["k"] == 10 and entry["protocol_details"]["sampled_negatives"] == 20
        assert entry["protocol_details"]["users"] == 400 and "leave-last-out" in entry["protocol"]


def test_local_dp_point_is_skipped_when_noise_swamps_the_data(tiny_sweep):
    from bench.quality import LDP_MAX_GROWTH, sweep_point

    bench, _ = tiny_sweep
    point = sweep_point(bench, "local-dp", 0.5)  # flips 38% of 120 bits per shopper
    assert "hr_at_10" not in point and f"above {LDP_MAX_GROWTH:g}x" in point["skipped"]
    assert point["epsilon"] == 0.5 and point["unit"] == "record"


def test_plot_has_a_panel_per_dataset(tiny_sweep, tmp_path):
    from bench.quality import panels
    from flows.plots import privacy_utility_plot

    _, result = tiny_sweep
    drawn = panels({"datasets": {"a": result, "b": result}})
    assert [p.title.split(":")[0] for p in drawn] == ["a", "b"]
    labels = list(drawn[0].curves)
    assert len(labels) == 3 and all("δ=" in label for label in labels)
    assert any("δ=1e-05, rdp" in label for label in labels) and any("δ=0, pure-epsilon" in label for label in labels)
    assert drawn[0].references["popularity (no DP)"] == result["models"]["popularity"]["hr_at_10"]
    path = privacy_utility_plot(drawn, tmp_path / "q.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_run_panel_places_the_run_at_its_epsilon(tmp_path):
    from fedml.privacy.statement import PrivacyStatement
    from flows.plots import privacy_utility_plot, run_quality_panel

    train, test = _clustered()
    metrics = {"model": evaluate_ranking(ease_scorer(train, 10.0), train, test, k=10),
               "popularity": evaluate_ranking(popularity_scorer(train), train, test, k=10)}  # fmt: skip
    statement = PrivacyStatement(epsilon=3.5, delta=1e-5, unit="user", mechanism="dp-fedavg (clipped ...)",
                                 accountant="rdp (opacus)", sampling="poisson q=0.1")  # fmt: skip
    panel = run_quality_panel("shop", statement, metrics)
    [(label, points)] = panel.curves.items()
    assert points == [(3.5, metrics["model"].hit_rate)]
    assert "dp-fedavg (user-level, δ=1e-05, rdp (opacus))" in label
    assert panel.references == {"popularity (no DP)": metrics["popularity"].hit_rate}
    no_dp = run_quality_panel("shop", None, metrics)
    assert no_dp.curves == {} and no_dp.references["this run (no DP)"] == metrics["model"].hit_rate
    assert privacy_utility_plot([panel], tmp_path / "run.png").stat().st_size > 1000


def test_markdown_table_lists_every_mechanism_and_reference(tiny_sweep):
    from bench.quality import render_markdown

    _, result = tiny_sweep
    table = render_markdown({"epsilons": [4.0, 8.0], "datasets": {"shop": result}})
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ε=" not in line and "---" not in line]
    assert len(rows) == 3 and all(row.endswith(" |") for row in rows)
    fedavg = next(row for row in rows if row.startswith("| DP-FedAvg"))
    assert "(user, δ=1e-05, rdp" in fedavg
    assert fedavg.split(" | ")[1:] == ["not run", f"{result['sweep'][0]['hr_at_10']:.4f} |"]  # no point at ε=4
    assert f"popularity {result['models']['popularity']['hr_at_10']:.4f}" in table


def test_command_line_writes_the_report_and_the_plot(tmp_path, capsys):
    from bench.quality import main

    output = tmp_path / "q.json"
    args = ["--quick", "--datasets", "synthetic", "--epsilons", "8", "--mechanisms", "dp-fedavg", "--output",
            str(output), *[arg for setting in [*TINY, "data.n_shoppers=300"] for arg in ("--set", setting)]]  # fmt: skip
    assert main(args) == 0
    report = json.loads(output.read_text())
    result = report["datasets"]["synthetic"]
    assert report["quick"] and report["epsilons"] == [8.0] and result["shoppers"] == 300
    assert [p["mechanism"] for p in result["sweep"]] == ["dp-fedavg"] and "dp_fedavg_retention" in result
    assert output.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--table", str(output)]) == 0
    assert "| DP-FedAvg (user-level) (user, δ=1e-05" in capsys.readouterr().out
