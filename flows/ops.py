"""Operations commands for the people who run the shopping guide.

    python -m flows.ops run [pipeline options]         train, evaluate, register, gate (flows.pipeline)
    python -m flows.ops runs [--limit N]               latest training runs: epsilon, HR@10, gate
    python -m flows.ops versions                       model versions: epsilon, lifetime, audit, HR@10, gate
    python -m flows.ops promote VERSION --reason TEXT  put a version through the gate into production
    python -m flows.ops rollback --reason TEXT         production back to the version it replaced
    python -m flows.ops ledger [--cohort NAME]         the privacy ledger and each cohort's lifetime epsilon
    python -m flows.ops ledger --settle ENTRY --confirm-stopped --reason TEXT
                                                       charge a killed run what it reported, not all it planned

Everything is read from and recorded in the tracking store (``MLFLOW_TRACKING_URI``, else the
embedded local store). Promotion and rollback record who (``FEDML_ACTOR`` or the login name), when
and why on the versions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flows  # noqa: F401  (offline defaults before MLflow loads)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.toml"


def _config(args: argparse.Namespace):
    from fedml.config import load_config

    return load_config(args.config, [])


def _client():
    from flows import tracking

    return tracking.connect()


def run(args: argparse.Namespace) -> int:
    from flows.pipeline import main as pipeline_main

    return pipeline_main(args.pipeline_args)


def runs(args: argparse.Namespace) -> int:
    from flows.promotion import run_rows, table

    config = _config(args)
    print(table(run_rows(_client(), args.experiment or config.tracking.experiment, args.limit)))
    return 0


def versions(args: argparse.Namespace) -> int:
    from flows.promotion import table, version_rows

    config = _config(args)
    name = args.model or config.tracking.registered_model
    print(table(version_rows(_client(), name, config.tracking.production_alias)))
    return 0


def promote(args: argparse.Namespace) -> int:
    from fedml.gate import load_policy
    from flows.promotion import current_actor
    from flows.promotion import promote as promote_version

    config = _config(args)
    name, alias = args.model or config.tracking.registered_model, config.tracking.production_alias
    policy = load_policy(args.policy or config.tracking.policy_file)
    decision, holder = promote_version(_client(), name, alias, args.version, policy, current_actor(), args.reason)
    if decision.promote:
        print(f"{name} version {args.version} is {alias} (holder: version {holder})")
        return 0
    print(f"{name} version {args.version} NOT promoted: " + "; ".join(decision.reasons), file=sys.stderr)
    print(f"{name}@{alias} stays at version {holder or 'none'}", file=sys.stderr)
    return 1


def rollback(args: argparse.Namespace) -> int:
    from flows.promotion import current_actor
    from flows.promotion import rollback as roll_back

    config = _config(args)
    name, alias = args.model or config.tracking.registered_model, config.tracking.production_alias
    done = roll_back(_client(), name, alias, current_actor(), args.reason, to=args.to)
    print(f"{name}@{alias}: version {done.previous} -> version {done.restored}")
    return 0


def ledger(args: argparse.Namespace) -> int:
    from fedml.privacy.ledger import describe_entries
    from flows.ledger import MlflowLedger
    from flows.promotion import current_actor

    config = _config(args)
    book = MlflowLedger(_client(), args.experiment or config.tracking.ledger_experiment)
    if args.settle:
        if not args.confirm_stopped:
            print(
                "error: --settle needs --confirm-stopped: a run that is still alive could spend more", file=sys.stderr
            )
            return 2
        settled = book.settle(args.settle, current_actor(), args.reason or "run confirmed stopped")
        print(f"settled {settled.entry_id}: charged {settled.steps_charged} of {settled.planned.steps} planned steps")
    entries = book.entries()
    if args.cohort:
        entries = [e for e in entries if e.cohort == args.cohort]
    delta = args.delta if args.delta is not None else config.privacy.delta
    print(describe_entries(entries, delta, args.accountant or config.privacy.accountant))
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m flows.ops", description=__doc__.splitlines()[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    commands = top.add_subparsers(dest="command", required=True)

    def command(name: str, handler, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", default=str(DEFAULT_CONFIG), help="run configuration (names, delta, accountant)")
        sub.set_defaults(handler=handler)
        return sub

    sub = commands.add_parser("run", help="run the training pipeline (options as python -m flows.pipeline)")
    sub.add_argument("pipeline_args", nargs=argparse.REMAINDER, help="passed to the pipeline")
    sub.set_defaults(handler=run)
    sub = command("runs", runs, "the latest training runs with their epsilon, HR@10 and gate decision")
    sub.add_argument("--limit", type=int, default=20)
    sub.add_argument("--experiment", help="default from the configuration")
    sub = command("versions", versions, "model versions with epsilon, lifetime epsilon, audit, HR@10, gate")
    sub.add_argument("--model", help="registered model (default from the configuration)")
    sub = command("promote", promote, "put a version through the promotion gate into production")
    sub.add_argument("version")
    sub.add_argument("--reason", required=True, help="why (recorded on the version)")
    sub.add_argument("--model", help="registered model (default from the configuration)")
    sub.add_argument("--policy", help="promotion policy (default from the configuration)")
    sub = command("rollback", rollback, "point production back at the version it replaced")
    sub.add_argument("--reason", required=True, help="why (recorded on both versions)")
    sub.add_argument("--to", help="a specific earlier production version")
    sub.add_argument("--model", help="registered model (default from the configuration)")
    sub = command("ledger", ledger, "the privacy ledger and each cohort's lifetime epsilon")
    sub.add_argument("--cohort", help="only this cohort")
    sub.add_argument("--experiment", help="the ledger's MLflow experiment (default from the configuration)")
    sub.add_argument("--delta", type=float, help="report epsilon at this delta (default from the configuration)")
    sub.add_argument("--accountant", choices=["rdp", "prv"], help="the accountant for the lifetime figure")
    sub.add_argument("--settle", metavar="ENTRY_ID", help="close the open entry of a run that was killed: charge "
                     "the rounds it reported plus the one in flight instead of all it planned")  # fmt: skip
    sub.add_argument("--confirm-stopped", action="store_true", help="with --settle: the run's process is gone")
    sub.add_argument("--reason", help="with --settle: why (recorded on the entry)")
    return top


def main(argv: list[str] | None = None) -> int:
    from fedml.privacy.ledger import LedgerError
    from flows.promotion import PromotionError

    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except (PromotionError, LedgerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
