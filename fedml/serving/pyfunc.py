"""The shopping guide as an MLflow pyfunc model: ``mlflow.pyfunc.load_model(uri).predict(frame)``.

Input: a DataFrame with a ``history`` column (each cell a list of the shop's item ids, oldest
first) and an optional ``k`` column (default 10). Output: one row per request with ``items``,
``scores`` and ``unknown_items`` (lists).

Through ``mlflow.pyfunc.load_model`` the logged signature is enforced: a ``history`` cell must be a
list or a numpy array of strings (an empty list is a cold start); a comma-separated string, a tuple
or None is rejected by MLflow before ``predict`` runs, and ``k`` must be an integer column (a float
column, e.g. one with a missing value, is rejected too). ``_as_list``'s string and None handling
only applies when ``ShoppingGuideModel.predict`` is called directly.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import pandas as pd

from fedml.serving.recommender import Recommender

ARTIFACT_KEY = "recommender"
DEFAULT_K = 10


class ShoppingGuideModel(mlflow.pyfunc.PythonModel):
    """Loads the recommender directory logged as the ``recommender`` artifact."""

    def load_context(self, context: Any) -> None:
        self.recommender = Recommender.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if "history" not in model_input.columns:
            raise ValueError("input needs a 'history' column: a list of item ids per row")
        ks = model_input["k"] if "k" in model_input.columns else pd.Series([DEFAULT_K] * len(model_input))
        rows = []
        for history, k in zip(model_input["history"], ks):
            k = DEFAULT_K if pd.isna(k) else int(k)
            rec = self.recommender.recommend(_as_list(history), k=k)
            rows.append({"items": rec.items, "scores": rec.scores, "unknown_items": rec.unknown_items})
        return pd.DataFrame(rows, columns=["items", "scores", "unknown_items"])


def signature() -> Any:
    """Input and output schema logged with the model."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    inputs = Schema([ColSpec(Array(DataType.string), "history"), ColSpec(DataType.long, "k", required=False)])
    outputs = Schema(
        [
            ColSpec(Array(DataType.string), "items"),
            ColSpec(Array(DataType.double), "scores"),
            ColSpec(Array(DataType.string), "unknown_items"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def _as_list(history: Any) -> list[str]:
    if history is None:
        return []
    if isinstance(history, str):
        return [part.strip() for part in history.split(",") if part.strip()]
    return [str(item) for item in list(history)]
