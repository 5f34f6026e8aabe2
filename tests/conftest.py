"""Shared fixtures: real data location, and one real MLflow server and Prefect API per test session."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDML_DATA_DIR", ROOT.parent / "shared" / "data"))
BIN = Path(sys.executable).parent

OFFLINE_ENV = {
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
    "GX_ANALYTICS_ENABLED": "false",
}


def pytest_configure(config: pytest.Config) -> None:
    os.environ.update(OFFLINE_ENV)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tests of many tiny tensor ops: one intra-op thread (see fedml.threads)."""
    from fedml.threads import single_thread

    with single_thread():
        yield


def data_path(*parts: str) -> Path:
    """A real data set under ``FEDML_DATA_DIR``; skips the test, saying why, when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set FEDML_DATA_DIR to the shared data folder)")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def wait_healthy(self, health_path: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.process.returncode}; log:\n{self.log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(self.url + health_path, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(
            f"server at {self.url} not healthy after {timeout:.0f} s; log:\n{self.log.read_text()[-3000:]}"
        )

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _start(args: list[str], log: Path, env: dict[str, str], url: str) -> Server:
    handle = log.open("w")
    process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env})
    return Server(url=url, process=process, log=log)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """A real ``mlflow server`` (SQLite store, separate artifact root) and a real ``prefect server``.

    Both start at once (each takes 10-20 s) and serve the whole session.
    """
    root = tmp_path_factory.mktemp("servers")
    mlflow_port, prefect_port = free_port(), free_port()
    mlflow = _start(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "mlartifacts"), "--host", "127.0.0.1",
         "--port", str(mlflow_port), "--workers", "1"],
        root / "mlflow.log", {}, f"http://127.0.0.1:{mlflow_port}",
    )  # fmt: skip
    prefect = _start(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
        root / "prefect.log", {"PREFECT_HOME": str(root / "prefect")}, f"http://127.0.0.1:{prefect_port}",
    )  # fmt: skip
    try:
        mlflow.wait_healthy("/health")
        prefect.wait_healthy("/api/health")
        yield {"mlflow": mlflow, "prefect": prefect}
    finally:
        mlflow.stop()
        prefect.stop()


def _flush_prefect_logs() -> None:
    """Send queued flow-run logs while the Prefect API is still up (else they fail after the tests)."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


@pytest.fixture
def pipeline_env(servers: dict[str, Server], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Point the pipeline at the session's servers and a scratch folder; yields the folder."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["mlflow"].url)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "expectations", tmp_path / "expectations")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    with temporary_settings({PREFECT_API_URL: servers["prefect"].url + "/api"}):
        yield tmp_path
        _flush_prefect_logs()
