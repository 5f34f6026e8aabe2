"""Scheduled retraining: register the training flow as a Prefect deployment with a cron schedule.

    python -m flows.deploy                      nightly deployment on the process work pool `fedml`
    python -m flows.deploy --cron "0 3 * * 1"   another schedule (cron, in --timezone)
    python -m flows.deploy --set data.n_shoppers=50000 --policy configs/promotion-policy.toml
    python -m flows.deploy --serve              no work pool: this process schedules and runs the flow

A worker then runs the scheduled flow runs: ``prefect worker start --pool fedml``. Each run starts
in ``--workdir`` (default: the repository root), where the configuration, the promotion policy and
the expectations live. The worker passes its environment (``MLFLOW_TRACKING_URI``, credentials) on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import flows  # noqa: F401  (offline defaults before Prefect loads)

ROOT = Path(__file__).resolve().parents[1]
FLOW_NAME = "shopping-guide-training"
DEPLOYMENT = "nightly"
WORK_POOL = "fedml"
CRON = "0 2 * * *"
TIMEZONE = "UTC"
DEFAULT_CONFIG = "configs/default.toml"  # what `make run` trains, relative to the run's working directory


def parameters(config_file: str | None = None, overrides: list[str] | None = None, policy_file: str | None = None):
    """The flow's parameters as a deployment stores them (the arguments of ``training_pipeline``).

    Scheduled runs resume: a run killed mid-training (its checkpoint intact, its ledger entry open,
    its process gone) is continued by the next scheduled run of the same configuration and data,
    which then spends only the rounds that are left; with nothing to resume a run starts afresh.
    """
    return {
        "config_file": config_file,
        "overrides": list(overrides or []),
        "policy_file": policy_file,
        "resume": True,
    }


def ensure_work_pool(name: str = WORK_POOL) -> None:
    """Create the process work pool ``name`` unless the Prefect API already has it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            try:
                client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))
            except ObjectAlreadyExists:  # another deployer won the race
                pass
            return
    if pool.type != "process":
        raise ValueError(f"work pool {name!r} has type {pool.type!r}; this deployment needs a 'process' pool")


def deploy(
    name: str = DEPLOYMENT,
    work_pool: str = WORK_POOL,
    cron: str = CRON,
    timezone: str = TIMEZONE,
    flow_parameters: dict[str, Any] | None = None,
    workdir: Path = ROOT,
) -> UUID:
    """Create or update the deployment ``shopping-guide-training/<name>`` on ``work_pool``; returns its id."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    from flows.pipeline import training_pipeline

    ensure_work_pool(work_pool)
    return training_pipeline.deploy(
        name,
        work_pool_name=work_pool,
        schedules=[Cron(cron, timezone=timezone)],
        parameters=flow_parameters or parameters(),
        job_variables={"working_dir": str(Path(workdir).resolve())},
        concurrency_limit=1,  # one run at a time: a resuming run never continues one still training
        entrypoint_type=EntrypointType.MODULE_PATH,  # the installed package: no image, no code upload
        description="Scheduled retraining of the shopping guide: validate, train with privacy, register, gate.",
        tags=["fedml", "retraining"],
        print_next_steps=False,
        ignore_warnings=True,  # a process pool is the point here, not a development stand-in
    )


def serve(name: str, cron: str, timezone: str, flow_parameters: dict[str, Any]) -> None:
    """Run the schedule in this process (``flow.serve``): for a single host without a work pool."""
    from prefect.schedules import Cron

    from flows.pipeline import training_pipeline

    training_pipeline.serve(name=name, schedules=[Cron(cron, timezone=timezone)], parameters=flow_parameters)


def _api_url() -> str | None:
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT, help="deployment name (default: %(default)s)")
    parser.add_argument("--pool", default=WORK_POOL, help="process work pool (default: %(default)s)")
    parser.add_argument("--cron", default=CRON, help="schedule (default: %(default)r)")
    parser.add_argument("--timezone", default=TIMEZONE, help="IANA time zone of the schedule (default: %(default)s)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="run configuration (TOML), relative to --workdir (default: %(default)s)")  # fmt: skip
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one configuration value (repeatable)")  # fmt: skip
    parser.add_argument("--policy", default=None, help="promotion policy (TOML); default from the configuration")
    parser.add_argument("--workdir", type=Path, default=ROOT, help="where flow runs start (default: %(default)s)")
    parser.add_argument("--serve", action="store_true", help="serve the schedule from this process instead")
    args = parser.parse_args(argv)

    flow_parameters = parameters(args.config, args.overrides, args.policy)
    if not args.serve and not _api_url():
        parser.error("set PREFECT_API_URL to the Prefect server (after `make stack-up`: . .fedml/stack/env)")
    if args.serve:
        serve(args.name, args.cron, args.timezone, flow_parameters)
        return 0
    deployment_id = deploy(args.name, args.pool, args.cron, args.timezone, flow_parameters, args.workdir)
    print(f"deployment {FLOW_NAME}/{args.name} ({deployment_id}): {args.cron!r} {args.timezone} on pool {args.pool!r}")
    print(f"start a worker:  prefect worker start --pool {args.pool}")
    print(f"run it now:      prefect deployment run '{FLOW_NAME}/{args.name}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
