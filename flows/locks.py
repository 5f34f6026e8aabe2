"""One promotion at a time: an exclusive lock around "read production, decide, move the alias".

MLflow's registry has no compare-and-set on aliases, so two runs finishing together could each
judge itself against the same old production and the later write would win, even when it fails
the gate against the other. Promotion and rollback therefore hold a lock per registered model:

* with a shared Prefect API (``PREFECT_API_URL`` set: production, CI), a Prefect global
  concurrency limit of one slot, ``promotion-<model>``, enforced by the Prefect server for every
  process and host;
* otherwise (the embedded local stores of ``make run``), an exclusive ``flock`` on a file next to
  the local tracking store, which every process on this host shares.
"""

from __future__ import annotations

import fcntl
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flows._env import STATE_DIR


class LockTimeout(TimeoutError):
    """The lock was not free within the timeout."""


def lock_name(model_name: str) -> str:
    return "promotion-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


@contextmanager
def promotion_lock(model_name: str, timeout: float = 300.0) -> Iterator[str]:
    """Hold the model's promotion lock; yields how it is held (``prefect`` or ``file``)."""
    from prefect.settings import PREFECT_API_URL

    name = lock_name(model_name)
    if PREFECT_API_URL.value():
        with _prefect_lock(name, timeout):
            yield "prefect"
    else:
        with _file_lock(name, timeout):
            yield "file"


@contextmanager
def _prefect_lock(name: str, timeout: float) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    _ensure_limit(name)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout, strict=True):
            yield
    except TimeoutError as exc:
        raise LockTimeout(f"the promotion lock {name!r} was not free within {timeout:g} s") from exc


def _ensure_limit(name: str) -> None:
    """Create the one-slot limit if it does not exist (a concurrent creator's conflict is fine)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass


@contextmanager
def _file_lock(name: str, timeout: float) -> Iterator[None]:
    folder = STATE_DIR / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    with open(folder / f"{name}.lock", "a") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"the promotion lock {handle.name} was not free within {timeout:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
