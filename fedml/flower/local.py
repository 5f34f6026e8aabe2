"""A whole Flower federation on this machine: one SuperLink and N SuperNodes as separate processes.

For local trials, the integration tests and the pipeline's ``federated.engine = "flower"``: every
process listens on 127.0.0.1 only, on free ports. Each SuperNode holds one block of the shoppers of a
data file (``partition-id`` of ``num-partitions``). Processes are stopped by their own ids.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedml.config import RunConfig
from fedml.data.interactions import UserItems
from fedml.flower.app_project import RunSettings
from fedml.flower.certs import TlsFiles, generate_certificates
from fedml.flower.commands import FlowerRun, flower_env, submit_run, superlink_argv, supernode_argv
from fedml.flower.node_data import save_user_items

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class _Process:
    name: str
    process: subprocess.Popen
    log: Path


@dataclass
class LocalFederation:
    """Start with :meth:`start` (or ``with``); :meth:`run` trains; :meth:`stop_node` drops one node."""

    data: UserItems
    nodes: int
    workdir: Path | None = None  # logs, certificates, state; None: a temporary directory removed on close
    tls: bool = True  # certificates made on the fly; False: --insecure
    _processes: list[_Process] = field(default_factory=list)
    _nodes: list[_Process] = field(default_factory=list)
    _runs: int = 0
    _owns_workdir: bool = False

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, timeout_s: float = 60.0) -> LocalFederation:
        if self.nodes < 1:
            raise ValueError(f"nodes must be at least 1, got {self.nodes}")
        if self.workdir is None:
            self.workdir, self._owns_workdir = Path(tempfile.mkdtemp(prefix="fedml-flower-")), True
        self.workdir = Path(self.workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.security: TlsFiles | None = generate_certificates(self.workdir / "certs", [HOST]) if self.tls else None
        data_file = save_user_items(self.workdir / "shoppers.npz", self.data)
        fleet, self.control = free_port(), free_port()
        link = superlink_argv(
            self.workdir / "superlink", self.security, host=HOST, fleet_port=fleet, control_port=self.control,
            serverappio_port=free_port(),
        )  # fmt: skip
        (self.workdir / "superlink").mkdir(exist_ok=True)
        self._processes.append(self._spawn("superlink", link))
        _wait_listening(self.control, self._processes[0], timeout_s)
        _wait_listening(fleet, self._processes[0], timeout_s)
        for i in range(self.nodes):
            argv = supernode_argv(
                f"{HOST}:{fleet}", data_file, self.security, partition_id=i, num_partitions=self.nodes,
                clientappio_port=free_port(),
            )  # fmt: skip
            node = self._spawn(f"supernode-{i}", argv)
            self._processes.append(node)
            self._nodes.append(node)
        return self

    def run(
        self,
        config: RunConfig,
        *,
        round_timeout_s: float = 120.0,
        node_wait_s: float = 120.0,
        init_file: str = "",
        on_event: Callable[[dict[str, Any]], None] | None = None,
        timeout_s: float | None = None,
    ) -> FlowerRun:
        """Train with ``config`` on this federation (all its nodes must connect first)."""
        self._runs += 1
        run_dir = self.workdir / f"run-{self._runs}"
        settings = RunSettings(
            output_dir=str(run_dir / "output"),
            min_nodes=self.nodes,
            node_wait_s=node_wait_s,
            round_timeout_s=round_timeout_s,
            init_file=init_file,
        )
        try:
            return submit_run(
                f"{HOST}:{self.control}", self.security, config, settings, workdir=run_dir, on_event=on_event,
                timeout_s=timeout_s,
            )  # fmt: skip
        except Exception as error:
            raise RuntimeError(f"{error}\n{self.logs_tail()}") from error

    def stop_node(self, index: int, sig: int = signal.SIGTERM) -> None:
        """Stop SuperNode ``index`` and the ClientApp it may be running (its process group)."""
        _signal(self._nodes[index].process, sig)
        self._nodes[index].process.wait(timeout=30)

    def close(self) -> None:
        for proc in reversed(self._processes):
            if proc.process.poll() is None:
                _signal(proc.process, signal.SIGTERM)
        for proc in self._processes:
            try:
                proc.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                _signal(proc.process, signal.SIGKILL)
                proc.process.wait()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def logs_tail(self, chars: int = 2000) -> str:
        parts = []
        for proc in self._processes:
            text = proc.log.read_text(errors="replace") if proc.log.exists() else ""
            parts.append(f"--- {proc.name} ({proc.log}) ---\n{text[-chars:]}")
        return "\n".join(parts)

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        log = self.workdir / f"{name}.log"
        home = self.workdir / "flwr-home" / name
        with log.open("ab") as handle:
            process = subprocess.Popen(
                argv, env=flower_env(home), stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
                cwd=self.workdir,
            )  # fmt: skip
        return _Process(name, process, log)


def _signal(process: subprocess.Popen, sig: int) -> None:
    """Signal the process group a spawned process leads (its id is the group's id)."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _wait_listening(port: int, proc: _Process, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} not listening on {HOST}:{port} after {timeout_s:.0f} s")
