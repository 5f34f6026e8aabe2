"""Two promotions at once cannot leave production on a version that fails the gate against the
other (real MLflow registry, real Prefect concurrency limit; a file lock without a Prefect API)."""

from __future__ import annotations

import contextvars
import threading
from pathlib import Path

import pytest

from fedml.gate import Policy
from tests.test_ops import PASSING, _register

pytestmark = pytest.mark.integration

MODEL = "ops-race"  # its own registered model: the other tests' versions must not be its production
POLICY = Policy(max_epsilon=8.0, min_hr_at_10=0.0, max_regression=0.02)


def _race(targets: list[tuple[str, str]]) -> list[tuple]:
    """Run promote() for each (version, actor) in its own thread, released together."""
    from mlflow import MlflowClient

    from flows.promotion import promote

    barrier = threading.Barrier(len(targets))
    results: list[tuple] = [None] * len(targets)  # type: ignore[list-item]

    def work(i: int, version: str, actor: str) -> None:
        barrier.wait()
        results[i] = promote(MlflowClient(), MODEL, "production", version, POLICY, actor, "race")

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(work, i, v, a))
        for i, (v, a) in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_promotions_never_leave_a_failing_version_in_production(pipeline_env: Path) -> None:
    from mlflow import MlflowClient

    from flows.locks import promotion_lock
    from flows.promotion import promote

    with promotion_lock(MODEL) as how:
        assert how == "prefect"  # the session's Prefect API is configured: its concurrency limit is the lock
    client = MlflowClient()
    base = _register(client, PASSING, MODEL)
    promote(client, MODEL, "production", base, POLICY, "setup", "baseline")
    for _ in range(3):
        better = _register(client, {**PASSING, "quality.hr_at_10": "0.50"}, MODEL)
        worse = _register(client, {**PASSING, "quality.hr_at_10": "0.30"}, MODEL)
        # each passes against the old production (0.30); the worse one fails against the better one
        _race([(better, "a"), (worse, "b")])
        holder = client.get_model_version_by_alias(MODEL, "production").version
        assert holder == better
        worse_tags = client.get_model_version(MODEL, worse).tags
        if worse_tags["gate.decision"] == "rejected":  # decided after the better one
            assert "regresses" in worse_tags["gate.reasons"]
        else:  # decided first, then replaced by the better one, decided against it
            assert client.get_model_version(MODEL, better).tags["gate.previous_production"] == worse


def test_the_file_lock_excludes_other_holders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    import flows.locks as locks

    monkeypatch.setattr(locks, "STATE_DIR", tmp_path)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        with locks.promotion_lock("m") as how:
            assert how == "file"
            with pytest.raises(locks.LockTimeout):
                with locks._file_lock(locks.lock_name("m"), timeout=0.2):
                    pass
        with locks._file_lock(locks.lock_name("m"), timeout=0.2):  # free again
            pass
