"""The per-run privacy report: accountants side by side, composition, threat model, Markdown."""

from __future__ import annotations

import pytest

from fedml.privacy.accountant import gaussian_epsilon
from fedml.privacy.ledger import Charge, LedgerEntry, lifetime
from fedml.privacy.local_dp import randomized_response_statement
from fedml.privacy.report import accountant_comparison, build_report, render_markdown
from fedml.privacy.statement import PrivacyStatement

FEDAVG = PrivacyStatement(
    epsilon=gaussian_epsilon(1.0, 0.1, 30, 1e-5, "rdp"), delta=1e-5, unit="user",
    mechanism="dp-fedavg (clipped client updates, gaussian noise on the sum, fixed denominator)",
    accountant="rdp (opacus)", sampling="poisson q=0.1", noise_multiplier=1.0, sample_rate=0.1, steps=30,
)  # fmt: skip
DPSGD = PrivacyStatement(
    epsilon=3.0, delta=1e-5, unit="record", mechanism="dp-sgd (opacus, ghost clipping)", accountant="rdp (opacus)",
    sampling="poisson q=0.01", noise_multiplier=1.1, sample_rate=0.01, steps=500,
)  # fmt: skip


def test_both_accountants_are_reported_and_agree_with_the_accountant():
    both = accountant_comparison(FEDAVG)
    assert both == {
        "rdp": pytest.approx(gaussian_epsilon(1.0, 0.1, 30, 1e-5, "rdp")),
        "prv": pytest.approx(gaussian_epsilon(1.0, 0.1, 30, 1e-5, "prv")),
    }
    assert both["prv"] < both["rdp"] == pytest.approx(FEDAVG.epsilon)
    assert accountant_comparison(randomized_response_statement(2.0)) == {}
    assert accountant_comparison(None) == {}


def test_report_of_a_federated_run_with_local_dp_says_how_they_compose_and_who_learns_what():
    local = randomized_response_statement(2.0)
    entry = LedgerEntry("e1", "shop", "user", Charge("dp-fedavg", 1.0, 0.1, 30), "finished", "r1", steps_charged=30)
    spent = lifetime([entry], "shop", 1e-5)
    report = build_report(FEDAVG, local, cohort="shop", lifetime=spent, lifetime_budget=20.0)
    assert report["lifetime"]["epsilon"] == pytest.approx(FEDAVG.epsilon)
    assert report["lifetime"]["budget"] == 20.0
    assert "post-processing" in report["composition"] and "only local DP protects" in report["composition"]
    threat = report["threat_model"]
    assert set(threat) == {"server", "another shopper", "model holder", "not covered"}
    assert "no secure aggregation" in threat["server"] and "local DP" in threat["server"]
    assert "whether any one shopper took part" in threat["model holder"]
    text = render_markdown(report)
    for expected in ("# Privacy report", "| RDP |", "| PRV |", "Lifetime budget of cohort `shop`", "Who can learn what",
                     "noise_multiplier | 1.0", "seeded, reproducible"):  # fmt: skip
        assert expected in text


def test_record_level_and_no_dp_reports_are_honest_about_their_limits():
    report = build_report(DPSGD, None, cohort="shop", secure_noise=True)
    assert "heavy shoppers are protected less" in report["threat_model"]["model holder"]
    assert "trusted with the raw data" in report["threat_model"]["server"]
    assert "cryptographically secure" in render_markdown(report)
    none = build_report(None, None, cohort="shop")
    assert "No differential privacy" in none["threat_model"]["server"]
    assert "none (no differential privacy" in render_markdown(none)
