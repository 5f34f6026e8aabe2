"""Operations commands for the people who run the shopping guide.

``python -m flows.ops ledger [--cohort NAME]`` shows the privacy ledger: every run's spending on
every cohort and each cohort's lifetime epsilon, read from the tracking store
(``MLFLOW_TRACKING_URI``, else the embedded local store).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import flows  # noqa: F401  (offline defaults before MLflow loads)

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "default.toml"


def ledger(args: argparse.Namespace) -> int:
    from fedml.config import load_config
    from fedml.privacy.ledger import describe_entries
    from flows import tracking
    from flows.ledger import MlflowLedger

    config = load_config(args.config, [])
    entries = MlflowLedger(tracking.connect(), args.experiment or config.tracking.ledger_experiment).entries()
    if args.cohort:
        entries = [e for e in entries if e.cohort == args.cohort]
    delta = args.delta if args.delta is not None else config.privacy.delta
    print(describe_entries(entries, delta, args.accountant or config.privacy.accountant))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.ops", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("ledger", help="show the privacy ledger and each cohort's lifetime epsilon")
    show.add_argument("--cohort", help="only this cohort")
    show.add_argument("--config", default=str(DEFAULT_CONFIG), help="run configuration (for delta, accountant)")
    show.add_argument("--experiment", help="the ledger's MLflow experiment (default from the configuration)")
    show.add_argument("--delta", type=float, help="report epsilon at this delta (default from the configuration)")
    show.add_argument("--accountant", choices=["rdp", "prv"], help="the accountant for the lifetime figure")
    show.set_defaults(handler=ledger)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
