"""End to end: the Prefect flow against a real MLflow server and a real Prefect API."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.integration

SMALL = [
    "data.n_shoppers=600",
    "data.n_items=150",
    "federated.rounds=4",
    "federated.client_rate=0.2",
    "evaluation.max_users=600",
]


def run_pipeline(overrides: list[str], policy_file: str | None = None):
    from flows.pipeline import training_pipeline

    return training_pipeline(None, overrides, policy_file, return_state=True)


def write_policy(path: Path, max_epsilon: float) -> str:
    path.write_text(
        f"[privacy]\nmax_epsilon = {max_epsilon}\nmax_delta = 1e-5\n"
        "[quality]\nmin_hr_at_10 = 0.0\nmax_regression = 1.0\n[validation]\nrequire_passed = true\n"
    )
    return str(path)


def test_second_run_over_the_epsilon_ceiling_is_registered_but_not_promoted(pipeline_env: Path) -> None:
    import mlflow
    from mlflow import MlflowClient

    name = "guide-gate"
    overrides = SMALL + [f"tracking.registered_model={name}", "tracking.experiment=gate-test"]
    first = run_pipeline(overrides, write_policy(pipeline_env / "lenient.toml", 50.0))
    assert first.is_completed(), first.message
    summary1 = first.result()
    assert summary1["promoted"] and summary1["version"] == "1"

    client = MlflowClient()
    run = client.get_run(summary1["run_id"])
    history = client.get_metric_history(run.info.run_id, "privacy/epsilon")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert all(a.value < b.value for a, b in zip(history, history[1:]))
    assert run.data.params["federated.rounds"] == "4"
    assert "train/loss" not in run.data.metrics, "un-noised diagnostics must not be published under DP"
    assert run.data.tags["privacy.unit"] == "user"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert {"validation/validation.json", "validation/quarantine.csv"} <= artifacts
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"privacy.md", "privacy.json", "evaluation.json"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/training.png",
        "plots/privacy.png",
        "plots/quality.png",
    }
    evaluation = json.loads(
        Path(client.download_artifacts(run.info.run_id, "evaluation.json", str(pipeline_env))).read_text()
    )
    assert evaluation["model"]["recall"] == evaluation["model"]["hit_rate"]
    assert evaluation["model"]["protocol_details"]["split"] == "leave-last-out by time"
    report = json.loads(Path(client.download_artifacts(run.info.run_id, "privacy.json", str(pipeline_env))).read_text())
    assert report["epsilon_by_accountant"]["prv"] < report["epsilon_by_accountant"]["rdp"]
    assert report["epsilon_by_accountant"]["rdp"] == pytest.approx(history[-1].value)
    assert set(report["threat_model"]) == {"server", "another shopper", "model holder", "not covered"}

    spent = float(client.get_model_version(name, "1").tags["privacy.epsilon"])
    assert spent == pytest.approx(history[-1].value)
    strict = write_policy(pipeline_env / "strict.toml", round(spent / 2, 3))
    second = run_pipeline(overrides, strict)
    assert second.is_completed(), "a refused promotion is an outcome, not a crash"
    summary2 = second.result()
    assert summary2["version"] == "2" and not summary2["promoted"]
    assert any("epsilon" in reason for reason in summary2["reasons"])

    v2 = client.get_model_version(name, "2")
    assert v2.tags["gate.decision"] == "rejected"
    assert "exceeds the ceiling" in v2.tags["gate.reasons"]
    for key in ("privacy.epsilon", "privacy.delta", "privacy.unit", "privacy.mechanism", "privacy.accountant",
                "data.fingerprint", "validation.passed"):  # fmt: skip
        assert key in v2.tags, key
    assert client.get_model_version_by_alias(name, "production").version == "1"

    model = mlflow.pyfunc.load_model(f"models:/{name}@production")
    prediction = model.predict(pd.DataFrame({"history": [["P00001", "P00002", "no-such-item"]], "k": [5]}))
    assert len(prediction.loc[0, "items"]) == 5
    assert list(prediction.loc[0, "unknown_items"]) == ["no-such-item"]


def _events_file(path: Path) -> tuple[Path, list[int]]:
    """A CSV of good rows for 40 shoppers, plus the bad rows whose positions are returned."""
    rows = []
    for shopper in range(40):
        for step in range(6):
            rows.append(
                (f"u{shopper}", f"i{(shopper * 7 + step * 3) % 60}", "view", "", 1_700_000_000 + shopper * 100 + step)
            )
    bad = [
        ("", "i1", "view", "", 1_700_000_001),  # missing shopper id
        ("u1", "i2", "teleport", "", 1_700_000_002),  # unknown event
        ("u2", "i3", "rating", "7", 1_700_000_003),  # rating out of range
        ("u3", "i4", "view", "", 4_000_000_000),  # timestamp in the future
    ]
    positions = []
    for offset, row in enumerate(bad):
        position = 10 + offset * 25
        rows.insert(position, row)
        positions.append(position)
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event", "rating", "timestamp"])
    frame.to_csv(path, index=False)
    return path, positions


def test_bad_rows_are_quarantined_and_the_run_goes_on(pipeline_env: Path) -> None:
    path, positions = _events_file(pipeline_env / "events.csv")
    overrides = ["data.source=events", f"data.path={path}", "federated.rounds=2", "federated.client_rate=0.5",
                 "tracking.registered_model=guide-events", "tracking.experiment=events-test"]  # fmt: skip
    state = run_pipeline(overrides, write_policy(pipeline_env / "policy.toml", 1e9))
    assert state.is_completed(), state.message
    summary = state.result()
    quarantine = pd.read_csv(Path(summary["run_dir"]) / "quarantine.csv")
    assert sorted(quarantine["source_row"]) == positions
    reasons = dict(zip(quarantine["source_row"], quarantine["quarantine_reason"]))
    assert "user_id" in reasons[positions[0]]
    assert "event" in reasons[positions[1]]
    assert "rating" in reasons[positions[2]]
    assert "timestamp" in reasons[positions[3]]
    assert summary["rows_quarantined"] == 4 and summary["rows_kept"] == 240


def test_missing_required_column_stops_the_run_naming_it(pipeline_env: Path, servers) -> None:
    """Run as a user runs it (the command line, its own process): one clear line, no traceback, no retry."""
    import os
    import subprocess
    import sys

    from prefect.settings import PREFECT_API_URL

    path = pipeline_env / "no_timestamp.csv"
    pd.DataFrame({"user_id": ["a", "b"], "item_id": ["x", "y"], "event": ["view", "view"]}).to_csv(path, index=False)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "MLFLOW_TRACKING_URI": servers["mlflow"].url}
    args = [sys.executable, "-m", "flows.pipeline"]
    for override in ("data.source=events", f"data.path={path}", "tracking.registered_model=guide-schema"):
        args += ["--set", override]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=pipeline_env, timeout=300)
    printed = done.stdout + done.stderr
    assert done.returncode == 1
    assert "pipeline failed:" in done.stderr and "timestamp" in done.stderr  # the user sees the error in one line ...
    assert "Traceback" not in printed  # ... without a traceback ...
    assert "Retrying" not in printed  # ... and a bad file is not read again
    from mlflow import MlflowClient

    assert not MlflowClient().search_model_versions("name='guide-schema'")
