"""Training checkpoints: written whole or not at all, read back only when intact.

A checkpoint file is a magic line, a JSON header line (format, run identity, the payload's length
and SHA-256) and the payload: ``torch.save`` of a dict of tensors and plain values, read back with
``weights_only=True`` (no pickled code runs on load). It is written to a temporary sibling and moved
into place with ``os.replace``, so a process killed while saving leaves the previous checkpoint. A
file that is truncated, corrupt or of another run is *detected and ignored* with a warning naming
the file and the reason: it is never half-loaded.

A run's identity is a hash of its configuration and its data's fingerprint: a checkpoint is only
ever resumed by a run that would have computed the same thing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedml.files import atomic_write_bytes

MAGIC = b"FEDML-CHECKPOINT\n"
FORMAT = 1
FILE_NAME = "latest.ckpt"
_MAX_HEADER = 4096

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (the message names the file and why)."""


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint holds: ``state`` (what training restores) and ``meta`` (who wrote it)."""

    identity: str
    state: dict[str, Any]
    meta: dict[str, Any]


def run_identity(config: Mapping[str, Any], data_fingerprint: str) -> str:
    """A short hash of the run configuration (as a plain dict) and the data's fingerprint."""
    canonical = json.dumps({"config": config, "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def write_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` to ``path`` atomically, readable by the owner only (it may hold devices' state)."""
    buffer = io.BytesIO()
    torch.save({"state": checkpoint.state, "meta": checkpoint.meta}, buffer)
    payload = buffer.getvalue()
    header = {
        "format": FORMAT,
        "identity": checkpoint.identity,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    return atomic_write_bytes(path, MAGIC + json.dumps(header).encode() + b"\n" + payload, mode=0o600)


def read_checkpoint(path: str | Path, identity: str | None = None) -> Checkpoint:
    """The checkpoint in ``path``; raises :class:`CheckpointError` unless it is whole, intact and
    (when ``identity`` is given) of that run identity."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot read it ({exc.strerror or exc})") from exc
    if not raw.startswith(MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a fedml checkpoint (bad magic line)")
    end = raw.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt header")
    try:
        header = json.loads(raw[len(MAGIC) : end])
        expected, digest, owner = int(header["bytes"]), str(header["sha256"]), str(header["identity"])
        version = int(header["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: corrupt header ({exc})") from exc
    if version != FORMAT:
        raise CheckpointError(f"checkpoint {path}: format {version}, this code reads format {FORMAT}")
    payload = raw[end + 1 :]
    if len(payload) != expected:
        raise CheckpointError(f"checkpoint {path}: truncated: {len(payload)} of {expected} payload bytes")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"checkpoint {path}: corrupt: the payload's SHA-256 does not match its header")
    if identity is not None and owner != identity:
        raise CheckpointError(f"checkpoint {path}: written by run identity {owner}, not {identity}")
    try:
        content = torch.load(io.BytesIO(payload), weights_only=True)
        state, meta = dict(content["state"]), dict(content["meta"])
    except Exception as exc:  # noqa: BLE001 (whatever torch raises, the file is unusable)
        raise CheckpointError(f"checkpoint {path}: payload does not load ({type(exc).__name__}: {exc})") from exc
    return Checkpoint(owner, state, meta)


class CheckpointStore:
    """The latest checkpoint of one run identity: ``<root>/<identity>/latest.ckpt``.

    ``meta`` (plain values: which tracking run and ledger entry wrote it, say) is saved with every
    state, so whoever resumes knows what it continues.
    """

    def __init__(self, root: str | Path, identity: str, meta: Mapping[str, Any] | None = None) -> None:
        self.identity = identity
        self.directory = Path(root) / identity
        self.meta = dict(meta or {})

    @property
    def path(self) -> Path:
        return self.directory / FILE_NAME

    def exists(self) -> bool:
        return self.path.exists()

    def save(self, state: Mapping[str, Any]) -> None:
        """Replace the latest checkpoint with ``state`` (atomically)."""
        write_checkpoint(self.path, Checkpoint(self.identity, dict(state), self.meta))

    def load(self) -> Checkpoint | None:
        """The latest checkpoint, or None when there is none or it is unusable (a warning says why)."""
        if not self.path.exists():
            return None
        try:
            return read_checkpoint(self.path, self.identity)
        except CheckpointError as exc:
            log.warning("ignoring %s", exc)
            return None

    def clear(self) -> None:
        """Delete this identity's checkpoints (the run is over: nothing to resume)."""
        shutil.rmtree(self.directory, ignore_errors=True)


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "read_checkpoint",
    "run_identity",
    "write_checkpoint",
]
