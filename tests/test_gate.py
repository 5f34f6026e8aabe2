"""The promotion gate: the policy file and every rule of ``decide``."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from fedml.gate import Candidate, GateDecision, Policy, PolicyError, decide, load_policy

REPO = Path(__file__).resolve().parents[1]
POLICY_FILE = REPO / "configs" / "promotion-policy.toml"
POLICY = Policy(
    max_epsilon=8.0,
    max_delta=1e-5,
    max_lifetime_epsilon=20.0,
    min_hr_at_10=0.05,
    max_regression=0.02,
    require_validation_passed=True,
)
GOOD = Candidate(epsilon=3.0, delta=1e-5, hr_at_10=0.20, validation_passed=True)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_load_the_repository_policy():
    assert load_policy(POLICY_FILE) == POLICY
    assert load_policy(str(POLICY_FILE)) == POLICY


def test_missing_keys_keep_defaults_and_ints_are_floats(tmp_path):
    policy = load_policy(_write(tmp_path, "[privacy]\nmax_epsilon = 4\n"))
    assert policy == Policy(max_epsilon=4.0)
    assert isinstance(policy.max_epsilon, float)
    assert load_policy(_write(tmp_path, "")) == Policy()


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(PolicyError, match="not found") as info:
        load_policy(missing)
    assert str(missing) in str(info.value)


@pytest.mark.parametrize(
    "text,key",
    [
        ("[privacy]\nmax_epsilon = 8.0\nmax_epsilonn = 3.0\n", "privacy.max_epsilonn"),  # unknown key
        ("[quality]\nmax_epsilon = 8.0\n", "quality.max_epsilon"),  # key in the wrong section
        ("[extra]\nthing = 1\n", "extra.thing"),  # unknown section
    ],
)
def test_unknown_key(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError, match="unknown") as info:
        load_policy(path)
    assert key in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize(
    "text,key",
    [
        ('[privacy]\nmax_epsilon = "8"\n', "privacy.max_epsilon"),
        ("[privacy]\nmax_delta = true\n", "privacy.max_delta"),
        ("[quality]\nmin_hr_at_10 = [0.1]\n", "quality.min_hr_at_10"),
        ("[validation]\nrequire_passed = 1\n", "validation.require_passed"),
        ('[validation]\nrequire_passed = "yes"\n', "validation.require_passed"),
    ],
)
def test_wrong_type(tmp_path, text, key):
    path = _write(tmp_path, text)
    with pytest.raises(PolicyError, match="must be") as info:
        load_policy(path)
    assert key in str(info.value) and str(path) in str(info.value)


def test_invalid_toml_and_non_table(tmp_path):
    path = _write(tmp_path, "[privacy\nmax_epsilon = 8\n")
    with pytest.raises(PolicyError, match="not valid TOML") as info:
        load_policy(path)
    assert str(path) in str(info.value)
    with pytest.raises(PolicyError, match=r"\[max_epsilon\] must be a table"):
        load_policy(_write(tmp_path, "max_epsilon = 8.0\n"))
    assert issubclass(PolicyError, ValueError)


def test_clean_candidate_is_promoted():
    decision = decide(GOOD, POLICY, production=Candidate(2.0, 1e-5, 0.21, True))
    assert decision == GateDecision(promote=True, reasons=[])
    assert decision.summary() == "promoted"
    # at the limits exactly: still promoted
    edge = Candidate(epsilon=8.0, delta=1e-5, hr_at_10=0.05, validation_passed=True)
    assert decide(edge, POLICY, production=Candidate(1.0, 1e-5, 0.07, True)).promote


@pytest.mark.parametrize(
    "changes,reason",
    [
        (dict(epsilon=8.5), "epsilon 8.500 exceeds the ceiling 8"),
        (dict(epsilon=math.inf), "no differential privacy guarantee (epsilon = inf)"),
        (dict(delta=1e-4), "delta 0.0001 exceeds the ceiling 1e-05"),
        (dict(hr_at_10=0.04), "HR@10 0.0400 is below the floor 0.05"),
        (dict(validation_passed=False), "data validation did not pass"),
    ],
)
def test_each_rule_gives_its_reason(changes, reason):
    candidate = Candidate(**{**vars(GOOD), **changes})
    decision = decide(candidate, POLICY, production=None)
    assert decision.promote is False
    assert decision.reasons == [reason]
    assert decision.summary() == "not promoted: " + reason


def test_regression_against_production():
    production = Candidate(epsilon=2.0, delta=1e-5, hr_at_10=0.30, validation_passed=True)
    decision = decide(GOOD, POLICY, production)  # 0.20 < 0.30 - 0.02
    assert not decision.promote
    assert decision.reasons == ["HR@10 0.2000 regresses more than 0.02 against production (0.3000)"]
    # within the allowed drop
    assert decide(Candidate(3.0, 1e-5, 0.285, True), POLICY, production).promote


def test_no_production_means_no_regression_check():
    assert decide(GOOD, POLICY, production=None).promote


def test_several_failures_are_all_reported():
    bad = Candidate(epsilon=math.inf, delta=1e-3, hr_at_10=0.01, validation_passed=False)
    decision = decide(bad, POLICY, production=Candidate(2.0, 1e-5, 0.30, True))
    assert not decision.promote
    assert decision.reasons == [
        "no differential privacy guarantee (epsilon = inf)",
        "delta 0.001 exceeds the ceiling 1e-05",
        "HR@10 0.0100 is below the floor 0.05",
        "HR@10 0.0100 regresses more than 0.02 against production (0.3000)",
        "data validation did not pass",
    ]
    assert decision.summary() == "not promoted: " + "; ".join(decision.reasons)


def test_validation_rule_can_be_switched_off():
    lenient = Policy(require_validation_passed=False)
    assert decide(Candidate(1.0, 1e-6, 0.1, validation_passed=False), lenient, None).promote


def test_nan_metrics_are_not_promoted():
    decision = decide(
        Candidate(epsilon=math.nan, delta=math.nan, hr_at_10=math.nan, validation_passed=True), POLICY, None
    )
    assert not decision.promote
    assert len(decision.reasons) == 3  # epsilon, delta and HR@10 rules all fail


def test_lifetime_budget_and_audit_rules(tmp_path):
    policy = load_policy(_write(tmp_path, "[privacy]\nmax_lifetime_epsilon = 10\nrequire_audit = true\n"))
    fine = Candidate(epsilon=4.0, delta=1e-5, hr_at_10=0.5, validation_passed=True, lifetime_epsilon=9.5,
                     audit_lower_bound=0.3)  # fmt: skip
    assert decide(fine, policy, None).promote
    over = decide(replace(fine, lifetime_epsilon=10.5), policy, None)
    assert over.reasons == ["the cohort's lifetime epsilon 10.500 exceeds its budget 10"]
    broken = decide(replace(fine, audit_lower_bound=4.2), policy, None)
    assert not broken.promote and "likely an implementation bug" in broken.reasons[0]
    unaudited = decide(replace(fine, audit_lower_bound=None), policy, None)
    assert unaudited.reasons == ["no empirical privacy audit was run"]
    # without the requirement, an unaudited version passes; an unbounded lifetime budget is the default
    assert decide(replace(fine, audit_lower_bound=None, lifetime_epsilon=1e9), Policy(), None).promote
    assert load_policy(_write(tmp_path, "[privacy]\nmax_lifetime_epsilon = inf\n")).max_lifetime_epsilon == math.inf
