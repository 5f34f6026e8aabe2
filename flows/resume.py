"""Resuming a pipeline run killed mid-training (``python -m flows.pipeline --resume``).

Every federated run checkpoints its training state after each round under
``<tracking.output_dir>/checkpoints/<run identity>/`` (identity: configuration + data fingerprint),
with the MLflow run and privacy-ledger entry that wrote it. A run started with ``--resume`` looks
for that checkpoint and continues the killed run when all of these hold:

* the checkpoint is intact and of this configuration and data (else it is ignored, with the reason);
* its ledger entry is still ``open`` (a run that ended closed it) and has not reported more rounds
  than the checkpoint holds (a round is never run twice);
* the process that wrote it is not alive on this host (a run still training is not resumed);
* its MLflow run exists and was not terminated.

Then the same MLflow run and the same ledger entry go on, so metrics continue at the right steps
and the entry is charged the planned rounds once. Otherwise the run starts afresh, saying why.
Resuming is asked for, not automatic: an open entry may belong to a run still training on
another host, which no local check can rule out.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedml.checkpoint import Checkpoint, CheckpointStore, run_identity
from fedml.config import RunConfig
from fedml.privacy.ledger import LedgerEntry, LedgerError
from flows.ledger import MlflowLedger


@dataclass(frozen=True)
class ResumePoint:
    """A killed run to continue: its last checkpoint, MLflow run and ledger entry."""

    checkpoint: Checkpoint
    run_id: str
    entry: LedgerEntry

    @property
    def round(self) -> int:
        return int(self.checkpoint.state["round"])

    @property
    def state(self) -> dict[str, Any]:
        return self.checkpoint.state


def checkpoint_store(config: RunConfig, fingerprint: str) -> CheckpointStore:
    """Where runs of this configuration on data with this fingerprint keep their checkpoint."""
    return CheckpointStore(
        Path(config.tracking.output_dir) / "checkpoints", run_identity(config.to_dict(), fingerprint)
    )


def writer_meta(run_id: str, entry_id: str) -> dict[str, Any]:
    """What a checkpoint records about the run that writes it."""
    return {"run_id": run_id, "ledger_entry": entry_id, "pid": os.getpid(), "host": socket.gethostname()}


def find_resume_point(
    config: RunConfig, store: CheckpointStore, ledger: MlflowLedger, client: Any
) -> tuple[ResumePoint | None, str]:
    """The killed run to continue, or None and why there is none."""
    if config.training.mode != "federated":
        return None, "only federated training resumes (central DP-SGD restarts from its first epoch)"
    if config.federated.engine == "flower":
        return None, "the Flower engine keeps no checkpoints (its rounds run in the Flower deployment)"
    checkpoint = store.load()
    if checkpoint is None:
        return None, f"no usable checkpoint at {store.path}"
    meta = checkpoint.meta
    run_id, entry_id = str(meta.get("run_id", "")), str(meta.get("ledger_entry", ""))
    pid, host = int(meta.get("pid", -1)), str(meta.get("host", ""))
    if host == socket.gethostname() and pid != os.getpid() and process_alive(pid):
        return None, f"the run that wrote {store.path} is still running (pid {pid})"
    try:
        entry = ledger.entry(entry_id)
    except LedgerError as exc:
        return None, f"{store.path}: {exc}"
    round_ = int(checkpoint.state["round"])
    if entry.status != "open":
        return None, f"ledger entry {entry_id} of run {run_id} is {entry.status}: that run ended"
    if entry.steps_done > round_:
        return None, (
            f"ledger entry {entry_id} reports {entry.steps_done} rounds done but the checkpoint holds {round_}: "
            "resuming would run rounds twice"
        )
    status = _run_status(client, run_id)
    if status != "RUNNING":
        return None, f"MLflow run {run_id} is {status or 'missing'}, not a run that was killed"
    return ResumePoint(checkpoint, run_id, entry), (
        f"resuming MLflow run {run_id} after round {round_} of {config.federated.rounds} "
        f"(ledger entry {entry_id} goes on; it reported {entry.steps_done} rounds)"
    )


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _run_status(client: Any, run_id: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).info.status
    except MlflowException:
        return None


__all__ = ["ResumePoint", "checkpoint_store", "find_resume_point", "process_alive", "writer_meta"]
