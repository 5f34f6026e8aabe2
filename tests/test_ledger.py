"""The lifetime budget ledger's arithmetic (storage in MLflow is tested with the pipeline)."""

from __future__ import annotations

import math

import pytest

from fedml.privacy.accountant import composed_epsilon, gaussian_epsilon
from fedml.privacy.ledger import (
    Charge,
    LedgerEntry,
    LedgerError,
    check_budget,
    describe_entries,
    lifetime,
)

DELTA = 1e-5
RUN = Charge("dp-fedavg", noise_multiplier=1.0, sample_rate=0.1, steps=30)


def entry(n: int, status: str = "finished", steps_charged: int | None = 30, cohort: str = "shop", **kw) -> LedgerEntry:
    return LedgerEntry(f"e{n}", cohort, kw.pop("unit", "user"), kw.pop("planned", RUN), status, f"run{n}",
                       f"2026-11-0{n}T00:00:00", steps_done=kw.pop("steps_done", 30), steps_charged=steps_charged)  # fmt: skip


def test_what_each_status_charges():
    assert entry(1).charged == RUN
    assert entry(1, "open", None, steps_done=3).charged == RUN  # may still spend all it planned
    assert entry(1, "failed", 4, steps_done=3).charged == RUN.with_steps(4)
    assert entry(1, "refused", 0).charged is None
    assert entry(1, "finished", 99).charged == RUN  # never more than planned
    pure = Charge("local dp", pure_epsilon=2.0)
    assert pure.with_steps(5) == pure


def test_lifetime_composes_runs_with_the_accountant_not_by_adding():
    entries = [entry(1), entry(2), entry(3, "failed", 10), entry(4, "refused", 0), entry(5, cohort="other")]
    total = lifetime(entries, "shop", DELTA, "rdp")
    assert total.runs == 3 and total.unit == "user"
    expected = composed_epsilon([(1.0, 0.1, 30), (1.0, 0.1, 30), (1.0, 0.1, 10)], DELTA, "rdp")
    assert total.epsilon == pytest.approx(expected)
    assert total.epsilon == pytest.approx(gaussian_epsilon(1.0, 0.1, 70, DELTA, "rdp"))
    assert total.epsilon < 2 * gaussian_epsilon(1.0, 0.1, 30, DELTA) + gaussian_epsilon(1.0, 0.1, 10, DELTA)
    assert set(total.by_accountant) == {"rdp", "prv"}
    assert total.by_accountant["prv"] < total.by_accountant["rdp"]
    assert lifetime(entries, "shop", DELTA, "prv").epsilon == total.by_accountant["prv"]
    assert lifetime(entries, "nobody", DELTA).epsilon == 0.0


def test_pure_charges_use_basic_composition_when_it_is_tighter():
    pure = Charge("local dp", pure_epsilon=1.5)
    entries = [entry(1, unit="record", planned=pure), entry(2, unit="record", planned=pure)]
    total = lifetime(entries, "shop", DELTA)
    assert total.accountant == "basic" and total.epsilon == 3.0
    assert total.by_accountant["rdp"] > 3.0  # for two charges the RDP route is looser


def test_check_refuses_the_run_that_would_pass_the_budget():
    budget = gaussian_epsilon(1.0, 0.1, 75, DELTA)  # room for two and a half runs of 30 rounds
    two = [entry(1), entry(2)]
    ok = check_budget(two[:1], "shop", "user", RUN, budget, DELTA)
    assert ok.allowed and "within budget" in ok.message()
    refused = check_budget(two, "shop", "user", RUN, budget, DELTA)
    assert not refused.allowed
    assert refused.with_run.epsilon == pytest.approx(gaussian_epsilon(1.0, 0.1, 90, DELTA))
    assert refused.spent.epsilon == pytest.approx(gaussian_epsilon(1.0, 0.1, 60, DELTA))
    assert refused.run_alone == pytest.approx(gaussian_epsilon(1.0, 0.1, 30, DELTA))
    message = refused.message()
    assert "refused before training" in message and f"{budget - refused.spent.epsilon:.3f} is left" in message
    # a smaller run still fits in what is left
    assert check_budget(two, "shop", "user", RUN.with_steps(10), budget, DELTA).allowed


def test_other_runs_open_entries_count_in_full_and_the_own_entry_is_excluded():
    budget = gaussian_epsilon(1.0, 0.1, 75, DELTA)
    running = [entry(1), entry(2, "open", None, steps_done=1)]
    assert not check_budget(running, "shop", "user", RUN, budget, DELTA).allowed
    assert check_budget(running, "shop", "user", RUN, budget, DELTA, exclude="e2").allowed


def test_units_do_not_mix_on_a_cohort_and_no_dp_voids_the_budget():
    with pytest.raises(LedgerError, match="budgeted per user"):
        check_budget([entry(1)], "shop", "record", RUN, 100.0, DELTA)
    no_dp = Charge("none", noise_multiplier=0.0, sample_rate=1.0, steps=1)
    check = check_budget([], "shop", "user", no_dp, 1e6, DELTA)
    assert not check.allowed and math.isinf(check.run_alone)
    with pytest.raises(LedgerError):
        Charge("both", noise_multiplier=1.0, sample_rate=0.1, pure_epsilon=1.0)
    with pytest.raises(LedgerError, match="budget"):
        check_budget([], "shop", "user", RUN, 0.0, DELTA)


def test_describe_lists_entries_and_the_lifetime():
    text = describe_entries([entry(1), entry(2, "open", None, steps_done=12)], DELTA)
    assert "12/30" in text and "open" in text and "charged all they planned" in text
    assert f"lifetime epsilon {gaussian_epsilon(1.0, 0.1, 60, DELTA):.3f}" in text
    assert describe_entries([], DELTA) == "the privacy ledger is empty"
