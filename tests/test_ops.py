"""The operations commands against the real MLflow server: promotion through the gate, rollback,
listings; who, when and why recorded on the versions."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MODEL = "ops-test"
PASSING = {"privacy.epsilon": "3.0", "privacy.delta": "1e-05", "privacy.unit": "user", "quality.hr_at_10": "0.30",
           "validation.passed": "true", "privacy.lifetime_epsilon": "3.0", "audit.epsilon_lower_bound": "0.0"}  # fmt: skip


def _register(client, tags: dict[str, str], model: str = MODEL) -> str:
    """A real registered version of ``model`` carrying the facts the pipeline records (no training needed)."""
    experiment = client.get_experiment_by_name("ops-test") or client.get_experiment(
        client.create_experiment("ops-test")
    )
    run = client.create_run(experiment.experiment_id)
    client.set_terminated(run.info.run_id)
    try:
        client.get_registered_model(model)
    except Exception:
        client.create_registered_model(model)
    version = client.create_model_version(model, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    for key, value in tags.items():
        client.set_model_version_tag(model, version.version, key, value)
    return version.version


def ops(*args: str) -> int:
    from flows.ops import main

    return main([*args, "--model", MODEL])


def test_promote_rollback_and_listings(pipeline_env: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    alias = lambda: client.get_model_version_by_alias(MODEL, "production").version  # noqa: E731
    monkeypatch.setenv("FEDML_ACTOR", "alice")
    policy = pipeline_env / "configs" / "promotion-policy.toml"

    first = _register(client, PASSING)
    assert ops("promote", first, "--reason", "first model", "--policy", str(policy)) == 0
    assert alias() == first
    tags = client.get_model_version(MODEL, first).tags
    assert (tags["gate.decided_by"], tags["gate.request_reason"], tags["gate.decision"]) == (
        "alice",
        "first model",
        "promoted",
    )
    assert tags["gate.decided_at"]

    second = _register(client, {**PASSING, "quality.hr_at_10": "0.31"})
    assert ops("promote", second, "--reason", "weekly retrain", "--policy", str(policy)) == 0
    assert alias() == second
    assert client.get_model_version(MODEL, second).tags["gate.previous_production"] == first
    # repeating a promotion of the version in production changes nothing
    assert ops("promote", second, "--reason", "again", "--policy", str(policy)) == 0 and alias() == second

    leaky = _register(client, {**PASSING, "privacy.epsilon": "50.0"})
    assert ops("promote", leaky, "--reason", "try", "--policy", str(policy)) == 1
    assert alias() == second
    assert "exceeds the ceiling" in client.get_model_version(MODEL, leaky).tags["gate.reasons"]
    assert "NOT promoted" in capsys.readouterr().err

    assert ops("rollback", "--reason", "bad recommendations") == 0
    assert alias() == first
    for version in (first, second):
        tags = client.get_model_version(MODEL, version).tags
        assert tags["rollback.by"] == "alice" and tags["rollback.reason"] == "bad recommendations"
    assert client.get_model_version(MODEL, second).tags["rollback.action"] == f"rolled back to {first}"

    # nothing before the first version; a version that failed the gate can never be restored
    assert ops("rollback", "--reason", "again") == 2
    assert "no previous production version" in capsys.readouterr().err
    assert ops("rollback", "--reason", "x", "--to", leaky) == 2
    assert "never passed the gate" in capsys.readouterr().err
    assert alias() == first

    assert ops("versions") == 0
    listing = capsys.readouterr().out
    assert listing.splitlines()[0].split()[:3] == ["version", "production", "epsilon"]
    assert any(line.split()[:2] == [first, "*"] for line in listing.splitlines())  # production is marked


def test_printed_tracking_uris_hide_passwords():
    from flows.tracking import redacted

    assert redacted("https://ops:s3cret@mlflow.example:5000/x") == "https://ops:***@mlflow.example:5000/x"
    assert redacted("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redacted("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
