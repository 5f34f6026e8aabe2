"""The Flower app project (what ``flwr run`` packs into a FAB): a ``pyproject.toml`` naming our apps.

The apps' code is the installed ``fedml`` package (runtime dependency installation stays off on the
SuperLink and the SuperNodes, so every machine needs ``fedml`` and ``flwr`` installed, see
``docs/flower.md``). The run's settings travel in ``[tool.flwr.app.config]``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedml.config import RunConfig

SERVER_APP = "fedml.flower.server_app:app"
CLIENT_APP = "fedml.flower.client_app:app"


@dataclass(frozen=True)
class RunSettings:
    """How the ServerApp runs (see :class:`fedml.flower.server_app.ServerSettings`)."""

    output_dir: str  # on the SuperLink's machine
    min_nodes: int = 1
    node_wait_s: float = 120.0
    round_timeout_s: float = 300.0
    init_file: str = ""  # an .npz initial table on the SuperLink's machine; empty: from the config


def write_app_project(directory: str | Path, config: RunConfig, settings: RunSettings) -> Path:
    """Write the app project into ``directory`` (created); returns it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {"name": "fedml-flower", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "fedml",
                    "components": {"serverapp": SERVER_APP, "clientapp": CLIENT_APP},
                    "config": {
                        "fedml-config": json.dumps(config.to_dict()),
                        "output-dir": str(settings.output_dir),
                        "init-file": str(settings.init_file),
                        "min-nodes": int(settings.min_nodes),
                        "node-wait-s": float(settings.node_wait_s),
                        "round-timeout-s": float(settings.round_timeout_s),
                    },
                }
            }
        },
    }
    (directory / "pyproject.toml").write_text(tomli_w.dumps(project))
    return directory
