"""MLflow: the run record, the logged model, the registry and its production alias.

Tracking goes to ``MLFLOW_TRACKING_URI`` when set (a tracking server, say), otherwise to the
embedded local store ``.fedml/mlflow.db`` with artifacts in ``.fedml/mlartifacts``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fedml.gate import Candidate, GateDecision
from fedml.privacy.statement import PrivacyStatement
from fedml.redaction import redacted  # noqa: F401  (re-exported: tracking.redacted)
from fedml.serving.recommender import Recommender
from flows._env import STATE_DIR

NO_PRIVACY_TAGS = {
    "privacy.epsilon": "inf",
    "privacy.delta": "0.0",
    "privacy.unit": "none",
    "privacy.mechanism": "none",
    "privacy.accountant": "none",
}


def tracking_uri() -> str:
    """The tracking URI in force: the environment's, else the embedded local store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STATE_DIR / 'mlflow.db'}"


def local_artifact_root() -> str | None:
    """Where a new experiment keeps artifacts when tracking locally (a server decides for itself)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return (STATE_DIR / "mlartifacts").as_uri()


def connect() -> MlflowClient:
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(client: MlflowClient, experiment: str, run_name: str, tags: dict[str, str]) -> str:
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        experiment_id = client.create_experiment(experiment, artifact_location=local_artifact_root())
    else:
        experiment_id = existing.experiment_id
    return client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(datetime.now(UTC).timestamp() * 1000)
    finite = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and math.isfinite(float(v))]
    if finite:
        client.log_batch(run_id, metrics=finite)


def set_run_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(key, str(value)) for key, value in tags.items()])


def log_json(client: MlflowClient, run_id: str, name: str, payload: Any, artifact_path: str | None = None) -> None:
    log_text(client, run_id, name, json.dumps(payload, indent=2, default=str), artifact_path)


def log_text(client: MlflowClient, run_id: str, name: str, text: str, artifact_path: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        client.log_artifact(run_id, str(path), artifact_path)


def privacy_tags(headline: PrivacyStatement | None, local: PrivacyStatement | None) -> dict[str, str]:
    """``privacy.*`` tags of the headline guarantee, ``privacy.local.*`` for local DP under a central one."""
    tags = dict(NO_PRIVACY_TAGS) if headline is None else headline.to_tags()
    if local is not None and local is not headline:
        tags.update({k.replace("privacy.", "privacy.local.", 1): v for k, v in local.to_tags().items()})
    return tags


def log_and_register_model(
    client: MlflowClient, run_id: str, recommender: Recommender, model_name: str, tags: dict[str, str]
) -> str:
    """Log the recommender as a pyfunc model in the run and register it; returns the version."""
    import fedml
    from fedml.serving.pyfunc import ShoppingGuideModel, signature

    package_dir = Path(fedml.__file__).parent
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        recommender_dir = recommender.save(Path(tmp) / "recommender")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ShoppingGuideModel(),
            artifacts={"recommender": str(recommender_dir)},
            signature=signature(),
            input_example=pd.DataFrame({"history": [list(recommender.ids.items[:2])], "k": [5]}),
            code_paths=[str(package_dir)],
            pip_requirements=[f"torch=={_version('torch')}", f"mlflow=={mlflow.__version__}", "numpy", "pandas"],
            registered_model_name=model_name,
        )
    version = str(info.registered_model_version)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    return version


def production_candidate(client: MlflowClient, model_name: str, alias: str) -> tuple[str, Candidate] | None:
    """The version holding ``alias`` and its gate facts, or None when there is none yet."""
    try:
        version = client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None
    return version.version, candidate_from_tags(version.tags)


def candidate_from_tags(tags: dict[str, str]) -> Candidate:
    """The gate facts recorded on a model version."""
    lifetime, audit = tags.get("privacy.lifetime_epsilon"), tags.get("audit.epsilon_lower_bound")
    return Candidate(
        epsilon=float(tags.get("privacy.epsilon", "inf")),
        delta=float(tags.get("privacy.delta", "1")),
        hr_at_10=float(tags.get("quality.hr_at_10", "0")),
        validation_passed=tags.get("validation.passed") == "true",
        lifetime_epsilon=None if lifetime is None else float(lifetime),
        audit_lower_bound=None if audit is None else float(audit),
    )


def record_decision(
    client: MlflowClient,
    model_name: str,
    version: str,
    decision: GateDecision,
    alias: str,
    previous: str | None,
    actor: str = "pipeline",
    reason: str = "scheduled training run",
) -> None:
    """Tag the version with the gate's decision (who, when, why); move the alias only when it is promoted."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    tags = {
        "gate.decision": "promoted" if decision.promote else "rejected",
        "gate.reasons": "; ".join(decision.reasons) or "all rules passed",
        "gate.decided_at": now,
        "gate.decided_by": actor,
        "gate.request_reason": reason,
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(model_name, alias, version)
        client.set_model_version_tag(model_name, version, "gate.previous_production", previous or "none")


def code_version() -> str:
    """The git commit of the working tree (with ``-dirty`` when it has changes), or ``unknown``."""
    try:
        root = Path(__file__).resolve().parents[1]
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package).split("+")[0]
