"""The production tracking stack for real: ``infra/local/start.sh`` starts PostgreSQL and the MLflow
tracking server (PostgreSQL backend store, a separate artifact folder, basic auth); the pipeline runs
against it with the session's Prefect API, and the run, the version and the production alias are
read back from PostgreSQL itself, the files from the artifact folder."""

from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import OFFLINE_ENV, ROOT, Server, _flush_prefect_logs, free_port
from tests.test_pipeline import SMALL, run_pipeline, write_policy

pytestmark = pytest.mark.integration

INFRA = ROOT / "infra" / "local"


@dataclass
class Stack:
    state: Path
    pg_port: int
    mlflow_url: str

    def secret(self, name: str) -> str:
        return (self.state / "secrets" / name).read_text().splitlines()[0]

    def sql(self, query: str, database: str = "mlflow") -> list[list[str]]:
        """Rows of ``query``, asked of PostgreSQL with psql as the stack's database role."""
        psql = shutil.which("psql") or sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
        result = subprocess.run(
            [psql, "-X", "-At", "-F", "\t", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", "fedml",
             "-d", database, "-v", "ON_ERROR_STOP=1", "-c", query],
            env={**os.environ, "PGPASSWORD": self.secret("db_password")}, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return [line.split("\t") for line in result.stdout.splitlines()]


def _have_postgres() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl"))


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if not _have_postgres():
        pytest.skip("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
    # under /tmp, not pytest's 0700 folder: as root the cluster runs as `postgres`, which must reach it
    state = Path(tempfile.mkdtemp(prefix="fedml-stack-"))
    state.chmod(0o755)
    pg_port, mlflow_port = free_port(), free_port()
    env = {**os.environ, **OFFLINE_ENV, "FEDML_STACK_DIR": str(state), "FEDML_VENV": sys.prefix,
           "FEDML_PG_PORT": str(pg_port), "MLFLOW_PORT": str(mlflow_port)}  # fmt: skip
    started = subprocess.run([str(INFRA / "start.sh"), "postgres", "mlflow"], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    try:
        assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
        yield Stack(state, pg_port, f"http://127.0.0.1:{mlflow_port}")
    finally:
        stopped = subprocess.run([str(INFRA / "stop.sh")], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, f"{stopped.stdout}\n{stopped.stderr}"
    assert "postgres stopped" in stopped.stdout and "mlflow stopped" in stopped.stdout, stopped.stdout


def test_secrets_are_private_and_unauthenticated_requests_are_refused(stack: Stack) -> None:
    secrets = stack.state / "secrets"
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o700
    for name in ("db_password", "mlflow_admin_password", "mlflow_secret_key", "serve_token"):
        assert stat.S_IMODE((secrets / name).stat().st_mode) == 0o600, name
        assert len(stack.secret(name)) == 48, name
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stack.mlflow_url + "/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
    assert refused.value.code == 401
    with urllib.request.urlopen(stack.mlflow_url + "/health", timeout=10) as health:
        assert health.status == 200


def test_pipeline_run_version_and_alias_land_in_postgresql_and_files_in_the_artifact_store(
    stack: Stack, servers: dict[str, Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.mlflow_url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.secret("mlflow_admin_password"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "expectations", tmp_path / "expectations")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    name, experiment = "guide-postgres", "postgres-test"
    overrides = SMALL + [f"tracking.registered_model={name}", f"tracking.experiment={experiment}",
                         "privacy.cohort=postgres-test"]  # fmt: skip
    with temporary_settings({PREFECT_API_URL: servers["prefect"].url + "/api"}):
        state = run_pipeline(overrides, write_policy(tmp_path / "lenient.toml", 50.0))
        _flush_prefect_logs()
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["promoted"] and summary["version"] == "1"
    assert summary["tracking_uri"] == stack.mlflow_url

    # the records, straight from PostgreSQL
    [[experiment_id, artifact_location]] = stack.sql(
        f"SELECT experiment_id, artifact_location FROM experiments WHERE name = '{experiment}'"
    )
    assert artifact_location == f"mlflow-artifacts:/{experiment_id}", "artifacts go through the server's store"
    assert stack.sql(f"SELECT status, experiment_id FROM runs WHERE run_uuid = '{summary['run_id']}'") == [
        ["FINISHED", experiment_id]
    ]
    assert stack.sql(f"SELECT version, run_id FROM model_versions WHERE name = '{name}'") == [["1", summary["run_id"]]]
    assert stack.sql(
        f"SELECT version FROM registered_model_aliases WHERE name = '{name}' AND alias = 'production'"
    ) == [["1"]]
    [[epsilon]] = stack.sql(f"SELECT value FROM model_version_tags WHERE name = '{name}' AND key = 'privacy.epsilon'")
    assert float(epsilon) == pytest.approx(summary["epsilon"])
    [[admins]] = stack.sql("SELECT count(*) FROM users WHERE is_admin", database="mlflow_auth")
    assert admins == "1"

    # the files, in the separate artifact folder
    artifacts = stack.state / "mlartifacts" / experiment_id
    assert (artifacts / summary["run_id"] / "artifacts" / "config.json").is_file()
    [mlmodel] = list((artifacts / "models").glob("m-*/artifacts/MLmodel"))
    assert (mlmodel.parent / "artifacts" / "recommender").is_dir()
