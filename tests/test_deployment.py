"""Scheduled retraining for real: the deployment on the session's Prefect server, a real process
worker as a subprocess, a triggered run, and a new model version in the session's MLflow server."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import BIN, OFFLINE_ENV, ROOT, Server
from tests.test_pipeline import SMALL, write_policy

pytestmark = pytest.mark.integration

RUN_TIMEOUT_S = 240.0


def _workdir(tmp_path: Path) -> Path:
    """Where flow runs start: the configuration, the policy and the expectations, as in the repository."""
    workdir = tmp_path / "work"
    shutil.copytree(ROOT / "configs", workdir / "configs")
    shutil.copytree(ROOT / "expectations", workdir / "expectations")
    return workdir


def _start_worker(pool: str, api_url: str, tracking_uri: str, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PREFECT_API_URL": api_url,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "FEDML_HOME": str(tmp_path / "fedml-home"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    log = tmp_path / "worker.log"
    args = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--install-policy", "never"]
    process = subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    return process, log


def _wait_final(flow_run_id: uuid.UUID, worker: subprocess.Popen, log: Path):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + RUN_TIMEOUT_S
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            flow_run = client.read_flow_run(flow_run_id)
            if flow_run.state is not None and flow_run.state.is_final():
                return flow_run
            if worker.poll() is not None:
                pytest.fail(f"worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
    pytest.fail(f"flow run not finished after {RUN_TIMEOUT_S:.0f} s; worker log:\n{log.read_text()[-3000:]}")


def test_triggered_deployment_runs_on_a_worker_and_registers_a_new_version(
    servers: dict[str, Server], tmp_path: Path
) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.deploy import FLOW_NAME, deploy, parameters

    tag = uuid.uuid4().hex[:8]
    model, pool, name = f"guide-deploy-{tag}", f"pool-{tag}", f"nightly-{tag}"
    workdir = _workdir(tmp_path)
    write_policy(workdir / "lenient.toml", 50.0)
    overrides = SMALL + [
        f"tracking.registered_model={model}",
        f"tracking.experiment=deploy-{tag}",
        f"privacy.cohort=deploy-{tag}",
    ]
    api_url = servers["prefect"].url + "/api"
    mlflow = MlflowClient(tracking_uri=servers["mlflow"].url, registry_uri=servers["mlflow"].url)

    with temporary_settings({PREFECT_API_URL: api_url}):
        deployment_id = deploy(name, pool, "0 2 * * *", "UTC", parameters(None, overrides, "lenient.toml"), workdir)
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment(deployment_id)
            pool_type = client.read_work_pool(pool).type
        assert pool_type == "process"
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in deployment.schedules] == [
            ("0 2 * * *", "UTC", True)
        ]
        assert deployment.parameters == {
            "config_file": None,
            "overrides": overrides,
            "policy_file": "lenient.toml",
            "resume": True,
        }
        assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
        assert deployment.job_variables["working_dir"] == str(workdir.resolve())
        assert not mlflow.search_model_versions(f"name='{model}'")

        worker, log = _start_worker(pool, api_url, servers["mlflow"].url, tmp_path)
        try:
            flow_run = run_deployment(f"{FLOW_NAME}/{name}", timeout=0)
            finished = _wait_final(flow_run.id, worker, log)
        finally:
            worker.terminate()
            worker.wait(timeout=30)

    assert finished.state.is_completed(), f"{finished.state.message}\nworker log:\n{log.read_text()[-3000:]}"
    assert finished.deployment_id == deployment_id
    versions = mlflow.search_model_versions(f"name='{model}'")
    assert [v.version for v in versions] == ["1"]
    run = mlflow.get_run(versions[0].run_id)
    assert run.data.tags["pipeline"] == "shopping-guide-training"
    assert run.data.params["data.n_shoppers"] == "600"
    assert (workdir / ".fedml" / "runs").is_dir(), "the run should start in the deployment's working directory"
