"""Promotion and rollback of the production alias, recorded on the versions (who, when, why).

Both the pipeline's gate step and the operations commands go through :func:`promote`, so a
version reaches production only through the gate, whoever asks.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from fedml.gate import GateDecision, Policy, decide
from flows.locks import promotion_lock
from flows.tracking import candidate_from_tags, production_candidate, record_decision


class PromotionError(RuntimeError):
    """A promotion or rollback that cannot be done; the message says why."""


def current_actor() -> str:
    """Who is acting: ``FEDML_ACTOR`` when set (CI, a scheduler), else the login name."""
    return os.environ.get("FEDML_ACTOR") or getpass.getuser()


def promote(
    client: MlflowClient,
    model_name: str,
    alias: str,
    version: str,
    policy: Policy,
    actor: str,
    reason: str,
) -> tuple[GateDecision, str | None]:
    """Run the gate for ``version`` against the current production and move ``alias`` if it passes.

    Returns the decision and the version that holds the alias afterwards. Runs under the model's
    promotion lock, so a concurrent promotion or rollback is decided after this one, against it.
    """
    with promotion_lock(model_name):
        return _promote(client, model_name, alias, version, policy, actor, reason)


def _promote(
    client: MlflowClient, model_name: str, alias: str, version: str, policy: Policy, actor: str, reason: str
) -> tuple[GateDecision, str | None]:
    try:
        tags = client.get_model_version(model_name, version).tags
    except MlflowException as exc:
        raise PromotionError(f"{model_name} has no version {version}: {exc.message}") from exc
    current = production_candidate(client, model_name, alias)
    if current is not None and current[0] == str(version):
        return GateDecision(True, []), str(version)  # already in production: nothing to do
    decision = decide(candidate_from_tags(tags), policy, current[1] if current else None)
    record_decision(client, model_name, str(version), decision, alias, current[0] if current else None, actor, reason)
    if decision.promote:
        return decision, str(version)
    return decision, current[0] if current else None


@dataclass(frozen=True)
class Rollback:
    previous: str  # the version that held the alias
    restored: str  # the version that holds it now


def rollback(
    client: MlflowClient, model_name: str, alias: str, actor: str, reason: str, to: str | None = None
) -> Rollback:
    """Point ``alias`` back at the version production had before (or at ``to``, a version that
    was in production once); both versions record who did it, when and why."""
    with promotion_lock(model_name):
        return _rollback(client, model_name, alias, actor, reason, to)


def _rollback(client: MlflowClient, model_name: str, alias: str, actor: str, reason: str, to: str | None) -> Rollback:
    current = production_candidate(client, model_name, alias)
    if current is None:
        raise PromotionError(f"{model_name}@{alias} does not exist: nothing to roll back")
    tags = client.get_model_version(model_name, current[0]).tags
    target = to or tags.get("gate.previous_production")
    if not target or target == "none":
        raise PromotionError(f"{model_name} version {current[0]} has no previous production version to roll back to")
    try:
        target_tags = client.get_model_version(model_name, target).tags
    except MlflowException as exc:
        raise PromotionError(f"{model_name} has no version {target}: {exc.message}") from exc
    if target_tags.get("gate.decision") != "promoted":
        raise PromotionError(f"{model_name} version {target} never passed the gate; it cannot be production")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_registered_model_alias(model_name, alias, target)
    for version, action in ((current[0], f"rolled back to {target}"), (target, f"restored in place of {current[0]}")):
        for key, value in {"rollback.action": action, "rollback.at": now, "rollback.by": actor,
                           "rollback.reason": reason}.items():  # fmt: skip
            client.set_model_version_tag(model_name, version, key, value)
    return Rollback(previous=current[0], restored=target)


def version_rows(client: MlflowClient, model_name: str, alias: str) -> list[dict[str, Any]]:
    """Every version of ``model_name`` with its privacy, quality and gate facts, newest first."""
    try:
        holder = client.get_model_version_by_alias(model_name, alias).version
    except MlflowException:
        holder = None
    rows = []
    for v in client.search_model_versions(f"name='{model_name}'"):
        t = v.tags
        rows.append({
            "version": v.version, alias: "*" if v.version == holder else "",
            "epsilon": t.get("privacy.epsilon", "?"), "unit": t.get("privacy.unit", "?"),
            "lifetime": t.get("privacy.lifetime_epsilon", "-"), "audit_lb": t.get("audit.epsilon_lower_bound", "-"),
            "hr@10": t.get("quality.hr_at_10", "?"), "gate": t.get("gate.decision", "-"),
            "decided_by": t.get("gate.decided_by", "-"), "created": _time(v.creation_timestamp),
        })  # fmt: skip
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def run_rows(client: MlflowClient, experiment: str, limit: int) -> list[dict[str, Any]]:
    """The latest training runs with their privacy, quality and gate outcome."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=limit, order_by=["start_time DESC"])
    return [
        {
            "run": r.info.run_id,
            "status": r.info.status,
            "started": _time(r.info.start_time),
            "epsilon": r.data.tags.get("privacy.epsilon", "-"),
            "cohort": r.data.tags.get("privacy.cohort", "-")[:30],
            "hr@10": _metric(r.data.metrics.get("quality/hr_at_10")),
            "gate": r.data.tags.get("gate.decision", "-"),
        }  # fmt: skip
        for r in runs
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as an aligned plain-text table."""
    if not rows:
        return "(none)"
    columns = list(rows[0])
    cells = [[_short(str(row[c])) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.isdigit() else f"{number:.4g}"


def _metric(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _time(millis: int | None) -> str:
    return "-" if millis is None else datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
