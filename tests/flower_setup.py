"""The small federation both Flower test modules train: its shop and its run configuration."""

from __future__ import annotations

from fedml.config import RunConfig, apply_override
from fedml.data.interactions import UserItems
from tests.clustered_shop import clustered_shop

N_USERS, N_ITEMS, NODES, DIM = 24, 32, 3, 8
SETTINGS = [
    f"model.dim={DIM}",
    "federated.client_rate=0.5",
    "federated.engine=reference",
    "federated.local_epochs=1",
    "federated.server_lr=5.0",
    "privacy.dp_fedavg.noise_multiplier=1.0",
    "privacy.dp_fedavg.clip_norm=0.1",  # small enough that some updates are clipped
    "privacy.dp_fedavg.weight_cap=4",
    "privacy.audit.enabled=false",
]


def flower_config(rounds: int, *overrides: str) -> RunConfig:
    """The federation's configuration: ``rounds`` rounds, then ``overrides``."""
    config = RunConfig()
    for override in [*SETTINGS, f"federated.rounds={rounds}", *overrides]:
        apply_override(config, override)
    return config


def flower_shop() -> UserItems:
    return clustered_shop(N_USERS, N_ITEMS, clusters=4, per_user=6)[0]
