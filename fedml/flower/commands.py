"""The processes of a Flower deployment: SuperLink, SuperNode and the ``flwr run`` that submits our app.

Each builder returns an argv list; :func:`flower_env` is the environment they need (Flower's
executables on ``PATH``, telemetry and runtime dependency installation off). ``security`` is either a
:class:`~fedml.flower.certs.TlsFiles` (TLS; clients need only its CA certificate) or ``None`` for
``--insecure`` (local trials only: traffic in clear, anyone can connect).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedml.config import RunConfig
from fedml.flower.app_project import RunSettings, write_app_project
from fedml.flower.certs import TlsFiles
from fedml.flower.server_app import EVENTS_FILE, MODEL_FILE, SUMMARY_FILE, FlowerRoundReport
from fedml.models.mf import ItemTable
from fedml.privacy.statement import PrivacyStatement

BIN = Path(sys.executable).parent
FEDERATION = "fedml"

#: Flower's defaults, except that 9095 (the REST fleet default) is left alone
SERVERAPPIO_PORT, FLEET_PORT, CONTROL_PORT, CLIENTAPPIO_PORT = 9091, 9092, 9093, 9094


def flower_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """The environment for Flower's processes (``FLWR_HOME``: where they keep apps and config)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        {
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def superlink_argv(
    state_dir: str | Path,
    security: TlsFiles | None,
    *,
    host: str = "0.0.0.0",
    fleet_port: int = FLEET_PORT,
    control_port: int = CONTROL_PORT,
    serverappio_port: int = SERVERAPPIO_PORT,
) -> list[str]:
    """``flower-superlink``: the Fleet API (SuperNodes) and the Control API (``flwr run``) on ``host``;
    the ServerAppIo API only on 127.0.0.1 (its ServerApp processes run on this machine)."""
    argv = [str(BIN / "flower-superlink"), *_server_security(security)]
    return argv + [
        "--disable-runtime-dependency-installation",
        "--serverappio-api-address", f"127.0.0.1:{serverappio_port}",
        "--fleet-api-address", f"{host}:{fleet_port}",
        "--control-api-address", f"{host}:{control_port}",
        "--database", str(Path(state_dir) / "state.db"),
    ]  # fmt: skip


def supernode_argv(
    superlink: str,
    data_file: str | Path,
    security: TlsFiles | Path | None,
    *,
    partition_id: int = 0,
    num_partitions: int = 1,
    clientappio_port: int = CLIENTAPPIO_PORT,
) -> list[str]:
    """``flower-supernode`` dialling the SuperLink's Fleet API (``host:port``), holding one data file's
    shoppers (or one block of them). ``security``: the CA certificate (or TlsFiles) to trust, or None."""
    node_config = f"data-file={json.dumps(str(Path(data_file).resolve()))} partition-id={int(partition_id)} num-partitions={int(num_partitions)}"
    return [
        str(BIN / "flower-supernode"), *_client_security(security),
        "--superlink", superlink,
        "--clientappio-api-address", f"127.0.0.1:{clientappio_port}",
        "--node-config", node_config,
    ]  # fmt: skip


def write_cli_config(flwr_home: str | Path, control: str, security: TlsFiles | Path | None) -> Path:
    """``$FLWR_HOME/config.toml`` naming the SuperLink's Control API as the federation ``fedml``."""
    import tomli_w  # noqa: PLC0415

    connection: dict[str, Any] = {"address": control}
    if security is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(_ca(security).resolve())
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps({"superlink": {"default": FEDERATION, FEDERATION: connection}}))
    return path


def run_argv(app_dir: str | Path) -> list[str]:
    """``flwr run`` of the app project on the ``fedml`` federation, streaming the ServerApp's logs."""
    return [str(BIN / "flwr"), "run", str(app_dir), FEDERATION, "--stream"]


def _server_security(security: TlsFiles | None) -> list[str]:
    if security is None:
        return ["--insecure"]
    return [
        "--ssl-ca-certfile", str(security.ca_cert),
        "--ssl-certfile", str(security.server_cert),
        "--ssl-keyfile", str(security.server_key),
    ]  # fmt: skip


def _client_security(security: TlsFiles | Path | None) -> list[str]:
    return ["--insecure"] if security is None else ["--root-certificates", str(_ca(security))]


def _ca(security: TlsFiles | Path) -> Path:
    return security.ca_cert if isinstance(security, TlsFiles) else Path(security)


# ---------------------------------------------------------------------------------------------
# Submitting a run and following it


@dataclass
class FlowerRun:
    """What the ServerApp left in its output directory."""

    table: ItemTable
    reports: list[FlowerRoundReport]
    statement: PrivacyStatement | None
    events: list[dict[str, Any]]


def submit_run(
    control: str,
    security: TlsFiles | Path | None,
    config: RunConfig,
    settings: RunSettings,
    *,
    workdir: str | Path | None = None,
    on_event: Callable[[dict[str, Any]], None] | None = None,
    timeout_s: float | None = None,
    log: Path | None = None,
) -> FlowerRun:
    """Submit our app to the SuperLink's Control API (``host:port``) and wait for it to finish.

    ``settings.output_dir`` is where the ServerApp writes: this machine must see it (run this on the
    SuperLink's machine, or on a shared file system). ``on_event`` sees each event of
    ``events.jsonl`` as it is written (``round_started``, ``round``, ...).
    """
    workdir = Path(workdir or tempfile.mkdtemp(prefix="fedml-flwr-run-"))
    app_dir = write_app_project(workdir / "app", config, settings)
    home = workdir / "flwr-home"
    write_cli_config(home, control, security)
    output = Path(settings.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    events_path = output / EVENTS_FILE
    if events_path.exists():
        raise FileExistsError(f"{events_path} exists: give each run its own output directory")
    log_handle = (log or workdir / "flwr-run.log").open("ab")
    process = subprocess.Popen(run_argv(app_dir), env=flower_env(home), stdout=log_handle, stderr=subprocess.STDOUT)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    events: list[dict[str, Any]] = []
    try:
        for event in _follow(events_path, process, deadline):
            events.append(event)
            if on_event is not None:
                on_event(event)
            if event["event"] in ("finished", "failed"):
                break
    finally:
        if process.poll() is None:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_handle.close()
    last = events[-1]["event"] if events else None
    if last != "finished":
        log_path = log or workdir / "flwr-run.log"
        if last == "failed":
            detail = events[-1].get("error")
        else:
            detail = f"no 'finished' event (flwr run exit {process.returncode})"
        tail = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"Flower run failed: {detail}; the SuperLink's log has more. {log_path}:\n{tail}")
    return read_run(output, events)


def read_run(output_dir: str | Path, events: list[dict[str, Any]] | None = None) -> FlowerRun:
    """The model, round reports and privacy statement a finished ServerApp wrote."""
    output = Path(output_dir)
    if events is None:
        events = [json.loads(line) for line in (output / EVENTS_FILE).read_text().splitlines() if line]
    with np.load(output / MODEL_FILE) as arrays:
        table = ItemTable.from_numpy(dict(arrays))
    reports = [round_report(e) for e in events if e["event"] == "round"]
    summary = json.loads((output / SUMMARY_FILE).read_text())
    statement = PrivacyStatement(**summary["statement"]) if summary["statement"] else None
    return FlowerRun(table, reports, statement, events)


def round_report(event: dict[str, Any]) -> FlowerRoundReport:
    """The round record in a ``round`` event."""
    return FlowerRoundReport(**{k: v for k, v in event.items() if k in FlowerRoundReport.__dataclass_fields__})


def _follow(path: Path, process: subprocess.Popen, deadline: float | None) -> Iterator[dict[str, Any]]:
    """The JSON lines of ``path`` as they are appended, until ``process`` has exited and all are read."""
    position = 0
    while True:
        exited = process.poll() is not None
        if path.exists():
            with path.open() as handle:
                handle.seek(position)
                while (line := handle.readline()).endswith("\n"):
                    position = handle.tell()
                    yield json.loads(line)
        if exited:
            return
        if deadline is not None and time.monotonic() > deadline:
            process.kill()
            raise TimeoutError(f"the Flower run did not finish in time (events in {path})")
        time.sleep(0.2)
