"""Crash safety against the real MLflow server and Prefect API: a pipeline process killed with
SIGKILL mid-training and started again with ``--resume`` continues from its last completed round.

The resumed model equals an uninterrupted run's (same seed); the killed process registered nothing
and left the production alias alone; the resumed run continues the killed run's MLflow run (metrics
at the right steps) and its privacy-ledger entry, which is charged the planned rounds exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedml.privacy.accountant import composed_epsilon
from tests.test_pipeline import SMALL

pytestmark = pytest.mark.integration

COHORT = "resume-test-shoppers"
MODEL = "resume-test"
ROUNDS = 60  # long enough to kill mid-training, however loaded the machine
SIGMA, Q, DELTA = 1.0, 0.2, 1e-5  # the default noise, SMALL's client rate, the default delta


def _ledger():
    from flows import tracking
    from flows.ledger import MlflowLedger

    return MlflowLedger(tracking.connect())


def _entries():
    return [e for e in _ledger().entries() if e.cohort == COHORT]


def _kill_after_rounds(process: subprocess.Popen, rounds: int, timeout: float = 300.0):
    """SIGKILL ``process`` once its ledger entry reports ``rounds`` rounds; the entry as it was then."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"the run to kill ended by itself with {process.returncode}")
            for entry in _entries():
                if entry.status == "open" and entry.steps_done >= rounds:
                    return entry
            time.sleep(0.2)
        raise AssertionError(f"the run to kill never reported {rounds} rounds")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)


def _table(servers, version: str):
    from fedml.serving.registry import RegistrySource

    return RegistrySource(MODEL, tracking_uri=servers["mlflow"].url).load(version).recommender.table


def test_a_killed_run_resumes_from_its_last_round_and_is_charged_once(pipeline_env: Path, servers) -> None:
    import torch
    from mlflow import MlflowClient

    from flows.pipeline import training_pipeline

    policy = pipeline_env / "policy.toml"
    policy.write_text(
        "[privacy]\nmax_epsilon = 50.0\nmax_delta = 1e-5\nmax_lifetime_epsilon = 100.0\n"
        "[quality]\nmin_hr_at_10 = 0.0\nmax_regression = 1.0\n"
    )
    overrides = [*SMALL, f"federated.rounds={ROUNDS}", f"privacy.cohort={COHORT}",
                 "tracking.experiment=resume-test", f"tracking.registered_model={MODEL}"]  # fmt: skip
    client = MlflowClient(servers["mlflow"].url)
    checkpoints = pipeline_env / ".fedml" / "runs" / "checkpoints"

    # 1: the uninterrupted run (same configuration and seed): version 1, in production. It asks to
    # resume, but there is nothing to resume: it starts afresh
    whole = training_pipeline(None, overrides, str(policy), True, return_state=True)
    assert whole.is_completed(), whole.message
    whole_summary = whole.result()
    assert whole_summary["version"] == "1" and whole_summary["promoted"]
    assert not list(checkpoints.rglob("*.ckpt")), "a finished run leaves no checkpoint"
    assert [(e.status, e.steps_charged) for e in _entries()] == [("finished", ROUNDS)]

    # 2: the same run in its own process, SIGKILLed after at least 2 rounds
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": servers["mlflow"].url}
    args = [sys.executable, "-m", "flows.pipeline", "--policy", str(policy)]
    for override in overrides:
        args += ["--set", override]
    with (pipeline_env / "killed.log").open("w") as log:
        killed = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=pipeline_env)
        seen = _kill_after_rounds(killed, 2)

    # what the kill left: an open entry, a checkpoint not behind it, nothing registered, production untouched
    [finished, open_] = _entries()
    assert finished.run_id == whole_summary["run_id"] and finished.status == "finished"
    assert open_.status == "open" and 2 <= seen.steps_done <= open_.steps_done < ROUNDS
    killed_run = open_.run_id
    assert client.get_run(killed_run).info.status == "RUNNING"
    [saved] = list(checkpoints.rglob("*.ckpt"))
    from fedml.checkpoint import read_checkpoint

    at_kill = read_checkpoint(saved)
    assert at_kill.meta["run_id"] == killed_run and at_kill.meta["ledger_entry"] == open_.entry_id
    assert open_.steps_done <= at_kill.state["round"] < ROUNDS
    print(f"killed with {open_.steps_done} of {ROUNDS} rounds reported, round {at_kill.state['round']} checkpointed")
    assert [v.version for v in client.search_model_versions(f"name='{MODEL}'")] == ["1"]
    assert client.get_model_version_by_alias(MODEL, "production").version == "1"

    # 3: started again with --resume: the same MLflow run and ledger entry go on from the checkpoint
    resumed = training_pipeline(None, overrides, str(policy), True, return_state=True)
    assert resumed.is_completed(), resumed.message
    summary = resumed.result()
    assert summary["run_id"] == killed_run and summary["version"] == "2" and summary["promoted"]
    assert client.get_model_version_by_alias(MODEL, "production").version == "2"
    assert not list(checkpoints.rglob("*.ckpt"))

    # the final model is the uninterrupted run's
    torch.testing.assert_close(_table(servers, "2").embeddings, _table(servers, "1").embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(_table(servers, "2").bias, _table(servers, "1").bias, rtol=0, atol=1e-6)

    # metrics continue at the right steps: epsilon per round as in the uninterrupted run
    def epsilon_by_round(run_id: str) -> dict[int, float]:
        history = client.get_metric_history(run_id, "privacy/epsilon")
        by_step: dict[int, set[float]] = {}
        for point in history:
            by_step.setdefault(point.step, set()).add(point.value)
        assert all(len(values) == 1 for values in by_step.values()), "a round logged two different values"
        return {step: values.pop() for step, values in by_step.items()}

    assert epsilon_by_round(killed_run) == epsilon_by_round(whole_summary["run_id"])
    assert sorted(epsilon_by_round(killed_run)) == list(range(1, ROUNDS + 1))
    run = client.get_run(killed_run)
    assert run.info.status == "FINISHED"
    assert any(
        v == f"after round {at_kill.state['round']}" for k, v in run.data.tags.items() if k.startswith("resumed.")
    )

    # the ledger: one entry for the killed-and-resumed run, charged exactly the planned rounds
    entries = _entries()
    assert [e.entry_id for e in entries] == [finished.entry_id, open_.entry_id]
    resumed_entry = entries[1]
    assert resumed_entry.status == "finished" and resumed_entry.steps_charged == ROUNDS
    assert resumed_entry.charged.steps == ROUNDS and resumed_entry.run_id == killed_run
    lifetime = composed_epsilon([(SIGMA, Q, ROUNDS), (SIGMA, Q, ROUNDS)], DELTA)
    tags = client.get_model_version(MODEL, "2").tags
    assert float(tags["privacy.lifetime_epsilon"]) == pytest.approx(lifetime, rel=1e-9)
    assert float(tags["privacy.epsilon"]) == float(client.get_model_version(MODEL, "1").tags["privacy.epsilon"])


def test_ledger_reads_past_an_entry_being_opened_and_resumes_only_open_entries(pipeline_env: Path) -> None:
    from fedml.privacy.ledger import Charge, LedgerError

    ledger = _ledger()
    cohort = "resume-ledger-unit"
    done = ledger.open(cohort, "user", Charge("dp-fedavg", SIGMA, Q, 5), "run-a")
    ledger.close(done.entry_id, "finished", 5)
    # an opener caught between creating its run and writing its params (or killed there)
    half = ledger.client.create_run(ledger._experiment_id(create=True), tags={"ledger.status": "open"})
    assert [e.entry_id for e in ledger.entries() if e.cohort == cohort] == [done.entry_id]
    with pytest.raises(LedgerError, match="never completely opened"):
        ledger.entry(half.info.run_id)
    with pytest.raises(LedgerError, match="is finished, not open"):
        ledger.resume(done.entry_id, "run-a", after=3)

    killed = ledger.open(cohort, "user", Charge("dp-fedavg", SIGMA, Q, 5), "run-b")
    ledger.progress(killed.entry_id, 2)
    with pytest.raises(LedgerError, match="belongs to training run run-b"):
        ledger.resume(killed.entry_id, "run-c", after=2)
    resumed = ledger.resume(killed.entry_id, "run-b", after=2)
    assert resumed.status == "open" and resumed.steps_done == 2
    assert ledger.client.get_run(killed.entry_id).data.tags["ledger.resumed"] == "1"
