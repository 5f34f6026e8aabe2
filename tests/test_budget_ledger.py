"""Scheduled-style runs on one cohort against the real MLflow server and Prefect API: the lifetime
budget ledger counts every run (a finished one, one killed midway) and refuses the run that would
pass the budget before it trains."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedml.privacy.accountant import composed_epsilon
from tests.test_pipeline import SMALL, run_pipeline

pytestmark = pytest.mark.integration

COHORT = "ledger-test-shoppers"
DELTA = 1e-5
Q = 0.2  # SMALL's client rate


def _policy(path: Path, lifetime_budget: float) -> str:
    path.write_text(
        f"[privacy]\nmax_epsilon = 50.0\nmax_delta = 1e-5\nmax_lifetime_epsilon = {lifetime_budget}\n"
        "[quality]\nmin_hr_at_10 = 0.0\nmax_regression = 1.0\n"
    )
    return str(path)


def _ledger():
    from flows import tracking
    from flows.ledger import MlflowLedger

    return MlflowLedger(tracking.connect())


def _wait_for_progress(run_id_of_killed: subprocess.Popen, timeout: float = 240.0):
    """The killed run's ledger entry once it has completed at least one round."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_id_of_killed.poll() is not None:
            raise AssertionError(f"the run to kill ended by itself: {run_id_of_killed.returncode}")
        for entry in _ledger().entries():
            if entry.cohort == COHORT and entry.status == "open" and entry.steps_done >= 1:
                return entry
        time.sleep(0.5)
    raise AssertionError("the run to kill never reported a round")


def test_third_run_over_the_lifetime_budget_is_refused_and_the_killed_run_still_counts(
    pipeline_env: Path, servers
) -> None:
    rounds_first, rounds_killed, rounds_third = 4, 400, 4
    spent_by_two = composed_epsilon([(1.0, Q, rounds_first), (1.0, Q, rounds_killed)], DELTA)
    spent_by_three = composed_epsilon([(1.0, Q, rounds_first), (1.0, Q, rounds_killed), (1.0, Q, rounds_third)], DELTA)
    budget = (spent_by_two + spent_by_three) / 2  # room for the first two, not the third
    policy = _policy(pipeline_env / "budget.toml", budget)
    common = [
        *SMALL,
        f"privacy.cohort={COHORT}",
        "tracking.experiment=ledger-test",
        "tracking.registered_model=ledger-test",
    ]

    # 1: a run that finishes
    first = run_pipeline([*common, f"federated.rounds={rounds_first}"], policy)
    assert first.is_completed()

    # 2: a run killed with SIGKILL in the middle of training (its own process, same servers)
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": servers["mlflow"].url}
    args = [sys.executable, "-m", "flows.pipeline", "--policy", policy]
    for override in [*common, f"federated.rounds={rounds_killed}"]:
        args += ["--set", override]
    log = (pipeline_env / "killed.log").open("w")
    killed = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=pipeline_env)
    try:
        _wait_for_progress(killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)

    # 3: would pass the lifetime budget: refused before it trains
    third = run_pipeline([*common, f"federated.rounds={rounds_third}"], policy)
    assert third.is_failed()
    with pytest.raises(Exception, match="refused before training") as refusal:
        third.result()
    assert f"lifetime budget {budget:g}" in str(refusal.value)

    entries = [e for e in _ledger().entries() if e.cohort == COHORT]
    assert [e.status for e in entries] == ["finished", "open", "refused"]
    finished, open_, refused = entries
    assert finished.steps_charged == rounds_first and finished.charged.steps == rounds_first
    # the killed run got somewhere, never closed its entry, and is charged all it planned
    assert 1 <= open_.steps_done < rounds_killed and open_.charged.steps == rounds_killed
    assert refused.charged is None and "refused before training" in refused.note

    # the refused run trained nothing and registered nothing
    from mlflow import MlflowClient

    client = MlflowClient(servers["mlflow"].url)
    third_run = client.get_run(refused.run_id)
    assert third_run.info.status == "FAILED"
    assert "privacy/epsilon" not in third_run.data.metrics
    versions = client.search_model_versions("name='ledger-test'")
    assert {v.run_id for v in versions} == {finished.run_id}
    assert client.get_model_version("ledger-test", versions[0].version).tags["privacy.lifetime_epsilon"] == repr(
        composed_epsilon([(1.0, Q, rounds_first)], DELTA)
    )

    # the ops command shows all of it
    shown = subprocess.run(
        [sys.executable, "-m", "flows.ops", "ledger", "--cohort", COHORT],
        env=env, capture_output=True, text=True, check=True, cwd=pipeline_env,
    )  # fmt: skip
    assert shown.stdout.count(COHORT) >= 3
    for status in ("finished", "open", "refused"):
        assert status in shown.stdout
    assert f"lifetime epsilon {spent_by_two:.3f}" in shown.stdout

    # an operator who knows the killed process is gone settles its entry: charged the rounds it
    # reported plus the one in flight; the third run's spend then fits and it trains
    settle = [sys.executable, "-m", "flows.ops", "ledger", "--cohort", COHORT, "--settle", open_.entry_id]
    refused_settle = subprocess.run(settle, env=env, capture_output=True, text=True, cwd=pipeline_env)
    assert refused_settle.returncode == 2 and "--confirm-stopped" in refused_settle.stderr
    subprocess.run([*settle, "--confirm-stopped", "--reason", "killed by the test"], env=env, check=True,
                   capture_output=True, text=True, cwd=pipeline_env)  # fmt: skip
    settled = next(e for e in _ledger().entries() if e.entry_id == open_.entry_id)
    assert settled.status == "failed" and settled.steps_charged == open_.steps_done + 1
    assert "settled by" in settled.note and "killed by the test" in settled.note
    fourth = run_pipeline([*common, f"federated.rounds={rounds_third}"], policy)
    assert fourth.is_completed(), fourth.message
