"""Checkpoints are written whole or not at all and read back only when intact; a federated run
resumed from one computes exactly what an uninterrupted run computes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from fedml.checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointStore,
    read_checkpoint,
    run_identity,
    write_checkpoint,
)
from fedml.config import RunConfig, apply_override
from fedml.training import train_model
from tests.clustered_shop import clustered_shop

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROUNDS = 6


def _checkpoint(value: float = 1.0) -> Checkpoint:
    return Checkpoint("abc", {"round": 3, "table": torch.full((4, 2), value), "rng": {"state": 2**100 + 7}},
                      {"run_id": "r1"})  # fmt: skip


def test_round_trip_keeps_tensors_and_plain_values(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "c.ckpt", _checkpoint(2.5))
    back = read_checkpoint(path, "abc")
    assert back.identity == "abc" and back.meta == {"run_id": "r1"}
    assert back.state["round"] == 3 and back.state["rng"] == {"state": 2**100 + 7}
    assert torch.equal(back.state["table"], torch.full((4, 2), 2.5))
    assert os.stat(path).st_mode & 0o777 == 0o600, "a checkpoint may hold devices' state: owner only"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda raw: raw[: len(raw) - 10], "truncated"),
        (lambda raw: raw[:20], "truncated or corrupt header"),
        (lambda raw: raw[:-5] + bytes([raw[-5] ^ 0xFF]) + raw[-4:], "SHA-256 does not match"),
        (lambda raw: b"PK" + raw[2:], "bad magic"),
        (lambda raw: b"", "bad magic"),
    ],
)
def test_damaged_checkpoint_is_detected_and_never_half_loaded(tmp_path: Path, damage, reason: str) -> None:
    path = write_checkpoint(tmp_path / "c.ckpt", _checkpoint())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=reason) as error:
        read_checkpoint(path, "abc")
    assert str(path) in str(error.value)


def test_store_ignores_an_unusable_checkpoint_with_a_clear_message(tmp_path: Path, caplog) -> None:
    store = CheckpointStore(tmp_path, "abc", meta={"run_id": "r1"})
    assert store.load() is None and not store.exists()
    store.save({"round": 1})
    assert store.load().state == {"round": 1}
    store.path.write_bytes(store.path.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING, logger="fedml.checkpoint"):
        assert store.load() is None
    assert f"ignoring checkpoint {store.path}: truncated" in caplog.text
    other = CheckpointStore(tmp_path, "abc")
    write_checkpoint(other.path, Checkpoint("xyz", {"round": 1}, {}))
    with pytest.raises(CheckpointError, match="written by run identity xyz, not abc"):
        read_checkpoint(other.path, "abc")
    store.clear()
    assert not store.directory.exists()


def test_a_save_that_dies_midway_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    store = CheckpointStore(tmp_path, "abc")
    store.save({"round": 1})

    def killed(src: str, dst: str) -> None:
        raise KeyboardInterrupt("killed between writing and renaming")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save({"round": 2})
    monkeypatch.undo()
    assert store.load().state == {"round": 1}
    assert [p.name for p in store.directory.iterdir()] == ["latest.ckpt"], "no temporary file left behind"


def test_identity_changes_with_config_and_data() -> None:
    config = RunConfig().to_dict()
    assert run_identity(config, "f1") == run_identity(RunConfig().to_dict(), "f1")
    assert run_identity(config, "f1") != run_identity(config, "f2")
    changed = RunConfig()
    apply_override(changed, "federated.rounds=31")
    assert run_identity(changed.to_dict(), "f1") != run_identity(config, "f1")


class Crash(Exception):
    pass


class CrashAfter:
    """Saves like a store, then dies (as a SIGKILL would) once round ``k``'s checkpoint is written."""

    def __init__(self, store: CheckpointStore, k: int) -> None:
        self.store, self.k = store, k

    def save(self, state: Any) -> None:
        self.store.save(state)
        if state["round"] == self.k:
            raise Crash


def _config(optimizer: str) -> RunConfig:
    config = RunConfig()
    for override in (
        f"federated.rounds={ROUNDS}", "federated.client_rate=0.3", "model.dim=8", "federated.local_epochs=1",
        "federated.server_lr=50", f"federated.server_optimizer={optimizer}", "privacy.dp_fedavg.noise_multiplier=0.8",
        "privacy.dp_fedavg.weight_cap=8",
    ):  # fmt: skip
        apply_override(config, override)
    return config


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resumed_federated_run_equals_the_uninterrupted_one(tmp_path: Path, optimizer: str) -> None:
    data, _ = clustered_shop(200, 60, 3, 6)
    config = _config(optimizer)
    whole = train_model(data, config)

    store = CheckpointStore(tmp_path, run_identity(config.to_dict(), "shop"))
    seen: list[int] = []
    with pytest.raises(Crash):
        train_model(data, config, checkpoints=CrashAfter(store, 3), on_round=lambda r: seen.append(r.round))
    assert seen == [1, 2], "round 3 was checkpointed, then the process died before reporting it"

    state = store.load().state
    assert state["round"] == 3 and state["accountant_steps"] == 3 and len(state["devices"]["clients"]) > 0
    resumed_rounds: list[int] = []
    resumed = train_model(
        data, config, checkpoints=store, resume=state, on_round=lambda r: resumed_rounds.append(r.round)
    )
    assert resumed_rounds == [4, 5, 6]
    assert store.load().state["round"] == ROUNDS
    torch.testing.assert_close(resumed.table.embeddings, whole.table.embeddings, rtol=0, atol=1e-6)
    torch.testing.assert_close(resumed.table.bias, whole.table.bias, rtol=0, atol=1e-6)
    assert [r.round for r in resumed.rounds] == list(range(1, ROUNDS + 1))
    assert [r.clients for r in resumed.rounds] == [r.clients for r in whole.rounds], "same Poisson samples"
    assert resumed.central.steps == whole.central.steps == ROUNDS
    assert resumed.central.epsilon == whole.central.epsilon


def test_a_checkpoint_of_another_shape_is_refused(tmp_path: Path) -> None:
    data, _ = clustered_shop(200, 60, 3, 6)
    config = _config("sgd")
    store = CheckpointStore(tmp_path, "x")
    with pytest.raises(Crash):
        train_model(data, config, checkpoints=CrashAfter(store, 1))
    apply_override(config, "model.dim=4")
    with pytest.raises(ValueError, match=r"item table is \(60, 8\)"):
        train_model(data, config, resume=store.load().state)
