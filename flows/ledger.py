"""The privacy ledger, kept in the MLflow tracking store next to the runs it accounts for.

Each ledger entry is an MLflow run in its own experiment (``privacy-ledger`` by default): what
the entry plans to spend is in its *params* (immutable once written), its progress is the
``ledger/steps_done`` metric (one point per round, an audit trail), and its status is the
``ledger.status`` tag and the run's own status (RUNNING while open). With a tracking server on
PostgreSQL the ledger is as durable, shared and backed up as the tracking data; an auditor reads
it in the MLflow UI, or with ``python -m flows.ops ledger``.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from mlflow import MlflowClient

from fedml.privacy.ledger import STATUSES, Charge, LedgerEntry, LedgerError
from flows.tracking import local_artifact_root, log_metrics, log_params, set_run_tags

RUN_STATUS = {"finished": "FINISHED", "failed": "FAILED", "refused": "KILLED"}


class MlflowLedger:
    """Ledger entries as runs of one MLflow experiment."""

    def __init__(self, client: MlflowClient, experiment: str = "privacy-ledger") -> None:
        self.client = client
        self.experiment = experiment

    def _experiment_id(self, create: bool) -> str | None:
        existing = self.client.get_experiment_by_name(self.experiment)
        if existing is not None:
            return existing.experiment_id
        if not create:
            return None
        return self.client.create_experiment(self.experiment, artifact_location=local_artifact_root())

    def entries(self) -> list[LedgerEntry]:
        """Every entry of the ledger, oldest first."""
        experiment_id = self._experiment_id(create=False)
        if experiment_id is None:
            return []
        entries, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id], max_results=1000, page_token=token, order_by=["start_time ASC"]
            )
            # a run whose params are not written yet is an entry being opened (or whose opener died
            # first): it has reserved nothing yet, and the opener checks the budget only once it has
            entries.extend(_entry(run) for run in page if "cohort" in run.data.params)
            token = page.token
            if not token:
                return entries

    def open(self, cohort: str, unit: str, charge: Charge, run_id: str) -> LedgerEntry:
        """Write a new open entry (a reservation of everything ``charge`` plans)."""
        started = datetime.now(UTC).isoformat(timespec="seconds")
        run = self.client.create_run(
            self._experiment_id(create=True),
            run_name=f"{cohort} / {run_id[:8]}",
            tags={"ledger.cohort": cohort, "ledger.status": "open", "ledger.training_run": run_id},
        )
        entry_id = run.info.run_id
        log_params(self.client, entry_id, {
            "cohort": cohort, "unit": unit, "mechanism": charge.mechanism,
            "noise_multiplier": charge.noise_multiplier, "sample_rate": charge.sample_rate,
            "planned_steps": charge.steps, "pure_epsilon": charge.pure_epsilon,
            "training_run_id": run_id, "opened_at": started,
        })  # fmt: skip
        return LedgerEntry(entry_id, cohort, unit, charge, "open", run_id, started)  # type: ignore[arg-type]

    def entry(self, entry_id: str) -> LedgerEntry:
        """One entry of this ledger; :class:`LedgerError` when there is no such entry."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(entry_id)
        except MlflowException as exc:
            raise LedgerError(f"no ledger entry {entry_id!r} in experiment {self.experiment!r}") from exc
        if run.info.experiment_id != self._experiment_id(create=False):
            raise LedgerError(f"run {entry_id} is not an entry of the ledger experiment {self.experiment!r}")
        if "cohort" not in run.data.params:
            raise LedgerError(f"ledger entry {entry_id} was never completely opened (it has no params)")
        return _entry(run)

    def resume(self, entry_id: str, run_id: str, after: int) -> LedgerEntry:
        """Continue a killed run's open entry in the run that resumes it (same training run), so the
        rounds spent before the kill and after the resumption are charged once, on one entry."""
        entry = self.entry(entry_id)
        if entry.status != "open":
            raise LedgerError(f"ledger entry {entry_id} is {entry.status}, not open: its run ended, it cannot go on")
        if entry.run_id != run_id:
            raise LedgerError(f"ledger entry {entry_id} belongs to training run {entry.run_id}, not {run_id}")
        resumed = int(self.client.get_run(entry_id).data.tags.get("ledger.resumed", "0")) + 1
        set_run_tags(self.client, entry_id, {
            "ledger.resumed": str(resumed),
            f"ledger.resumed.{resumed}": f"{datetime.now(UTC).isoformat(timespec='seconds')} after step {after}",
        })  # fmt: skip
        return entry

    def progress(self, entry_id: str, steps_done: int) -> None:
        """Record that ``steps_done`` rounds/steps have completed (and released their noise)."""
        log_metrics(self.client, entry_id, {"ledger/steps_done": steps_done}, step=steps_done)
        self.client.set_tag(entry_id, "ledger.steps_done", str(int(steps_done)))

    def settle(self, entry_id: str, actor: str, reason: str) -> LedgerEntry:
        """Close an open entry whose run is known to be dead: charged the rounds it reported plus the
        one in flight (as a run that failed with an error). Refuses entries that are not open."""
        entry = next((e for e in self.entries() if e.entry_id == entry_id), None)
        if entry is None:
            raise LedgerError(f"no ledger entry {entry_id!r} in experiment {self.experiment!r}")
        if entry.status != "open":
            raise LedgerError(f"ledger entry {entry_id} is {entry.status}, not open: nothing to settle")
        charged = min(entry.steps_done + 1, entry.planned.steps)
        self.close(entry_id, "failed", charged, note=f"settled by {actor}: {reason}")
        return next(e for e in self.entries() if e.entry_id == entry_id)

    def close(self, entry_id: str, status: str, steps_charged: int, note: str = "") -> None:
        """Settle an entry: ``finished``, ``failed`` (charged ``steps_charged``) or ``refused``."""
        if status not in RUN_STATUS:
            raise LedgerError(f"an entry closes as one of {sorted(RUN_STATUS)}, not {status!r}")
        set_run_tags(self.client, entry_id, {
            "ledger.status": status, "ledger.steps_charged": str(int(steps_charged)),
            "ledger.closed_at": datetime.now(UTC).isoformat(timespec="seconds"), "ledger.note": note[:4000],
        })  # fmt: skip
        self.client.set_terminated(entry_id, status=RUN_STATUS[status])


def _entry(run: Any) -> LedgerEntry:
    params, tags = run.data.params, run.data.tags
    status = tags.get("ledger.status", "open")
    if status not in STATUSES:
        raise LedgerError(f"ledger entry {run.info.run_id} has an unknown status {status!r}")
    charge = Charge(
        mechanism=params.get("mechanism", "unknown"),
        noise_multiplier=_number(params.get("noise_multiplier")),
        sample_rate=_number(params.get("sample_rate")),
        steps=int(params.get("planned_steps", "0")),
        pure_epsilon=_number(params.get("pure_epsilon")),
    )
    charged = tags.get("ledger.steps_charged")
    return LedgerEntry(
        entry_id=run.info.run_id,
        cohort=params["cohort"],
        unit=params["unit"],  # type: ignore[arg-type]
        planned=charge,
        status=status,  # type: ignore[arg-type]
        run_id=params.get("training_run_id", ""),
        started=params.get("opened_at", ""),
        steps_done=int(tags.get("ledger.steps_done", "0")),
        steps_charged=None if charged is None else int(charged),
        note=tags.get("ledger.note", ""),
    )


def _number(text: str | None) -> float | None:
    if text is None or text == "None":
        return None
    value = float(text)
    return value if not math.isnan(value) else None


class Spending:
    """A run's open ledger entry while it trains: records progress, settles on exit.

    Leaving the ``with`` block normally closes the entry as ``finished`` (charged what was done);
    an exception closes it as ``failed``, charged the completed steps plus the one in flight. A
    process killed outright leaves the entry open, and open entries are charged in full, until
    the run is resumed (``flows.pipeline --resume``) on the same entry: it starts from the steps
    the entry reports done.
    """

    def __init__(self, ledger: MlflowLedger, entry: LedgerEntry) -> None:
        self.ledger, self.entry, self.done = ledger, entry, entry.steps_done

    def step(self, steps_done: int) -> None:
        self.done = int(steps_done)
        self.ledger.progress(self.entry.entry_id, self.done)

    def __enter__(self) -> Spending:
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        planned = self.entry.planned.steps
        if error is None:
            self.ledger.close(self.entry.entry_id, "finished", planned if not self.done else self.done)
        else:
            self.ledger.close(self.entry.entry_id, "failed", min(self.done + 1, planned),
                              note=f"{type(error).__name__}: {error}")  # fmt: skip
