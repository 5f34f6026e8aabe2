"""The MLflow model registry as a model source: ``models:/<name>@<alias>``, polled for alias moves.

Asking which version holds the alias is one small REST call; only when it names another version
are that version's files downloaded and loaded. The tracking server is ``MLFLOW_TRACKING_URI``
(or the one given). MLflow is imported inside the functions, so the service starts without it
when it serves from a directory.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fedml.serving.recommender import Recommender
from fedml.serving.source import LoadedModel

DEFAULT_ARTIFACT = "artifacts/recommender"  # where flows.tracking logs the recommender inside the model


class RegistrySource:
    """The version of registered model ``name`` that holds ``alias``."""

    def __init__(self, name: str, alias: str = "production", tracking_uri: str | None = None) -> None:
        self.name = name
        self.alias = alias
        self.tracking_uri = tracking_uri
        self._client: Any = None
        self._tags: dict[str, dict[str, str]] = {}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def current_version(self) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None  # no such model or alias yet: nothing to serve, not an error
            raise
        self._tags[str(version.version)] = dict(version.tags)
        return str(version.version)

    def load(self, version: str) -> LoadedModel:
        from mlflow.artifacts import download_artifacts

        tags = self._tags.get(version)
        if tags is None:
            tags = dict(self.client.get_model_version(self.name, version).tags)
        with tempfile.TemporaryDirectory(prefix="fedml-serve-") as tmp:
            uri = f"models:/{self.name}/{version}"
            root = Path(
                download_artifacts(uri, dst_path=tmp, tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
            )
            recommender = Recommender.load(root / _recommender_path(root))
        tags = {**tags, "registry.alias": self.alias}
        return LoadedModel.build(self.name, version, recommender, tags)


def _recommender_path(model_dir: Path) -> str:
    """The ``recommender`` artifact's folder, as the model's MLmodel file records it."""
    import yaml

    mlmodel = model_dir / "MLmodel"
    if not mlmodel.exists():
        raise FileNotFoundError(f"{model_dir}: no MLmodel file; is this a model logged by flows.tracking?")
    flavor = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors", {}).get("python_function", {})
    return (flavor.get("artifacts") or {}).get("recommender", {}).get("path", DEFAULT_ARTIFACT)
