"""The empirical privacy audit in the pipeline: an honest DP-FedAvg run passes it; a broken one
(noise switched off while the accountant still claims its epsilon) is caught and not promoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_pipeline import SMALL, run_pipeline

pytestmark = pytest.mark.integration

AUDITED = [
    *SMALL,
    "privacy.dp_fedavg.noise_multiplier=3.0",  # a strong claim (epsilon ~ 0.5) the broken run cannot keep
    "privacy.audit.canaries=400",
    "privacy.cohort=audit-test",
    "tracking.registered_model=audit-test",
    "tracking.experiment=audit-test",
]


def _policy(path: Path) -> str:
    path.write_text("[privacy]\nmax_epsilon = 8.0\n[quality]\nmin_hr_at_10 = 0.0\nmax_regression = 1.0\n")
    return str(path)


def _version_tags(run_id: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient()
    (version,) = client.search_model_versions(f"run_id='{run_id}'")
    return version.tags


def test_audit_passes_honest_noise_and_blocks_a_mechanism_that_lies(
    pipeline_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policy = _policy(pipeline_env / "policy.toml")
    honest = run_pipeline(AUDITED, policy).result()
    tags = _version_tags(honest["run_id"])
    claimed = float(tags["privacy.epsilon"])
    assert float(tags["audit.epsilon_lower_bound"]) <= claimed < 1.0
    assert int(tags["audit.m"]) == 400 and honest["promoted"]

    # the bug: the aggregator adds no noise, the accountant still counts sigma = 3
    from fedml.federated.aggregation import DPFedAvg

    build = DPFedAvg.for_population.__func__

    def without_noise(cls, *args, **kwargs):
        return build(cls, *args, **{**kwargs, "noise_multiplier": 0.0})

    monkeypatch.setattr(DPFedAvg, "for_population", classmethod(without_noise))
    broken = run_pipeline(AUDITED, policy).result()
    tags = _version_tags(broken["run_id"])
    assert float(tags["privacy.epsilon"]) == pytest.approx(claimed)  # the claim did not change
    lower = float(tags["audit.epsilon_lower_bound"])
    assert lower > 2.0 > claimed
    assert not broken["promoted"] and tags["gate.decision"] == "rejected"
    assert "likely an implementation bug" in tags["gate.reasons"]
    assert broken["production_version"] == honest["version"]  # production still serves the honest model
    assert "CONTRADICTS the claim" in broken["audit"]
