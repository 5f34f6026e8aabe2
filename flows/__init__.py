"""Prefect flows over the ``fedml`` library: orchestration, tracking (MLflow) and the promotion gate."""

from flows._env import apply_offline_defaults

apply_offline_defaults()
