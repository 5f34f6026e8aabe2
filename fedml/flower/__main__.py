"""Commands of a Flower deployment (see ``docs/flower.md``).

    python -m fedml.flower certs      --out certs/ --host superlink.example.org
    python -m fedml.flower superlink  --state-dir state/ --ssl-ca-certfile certs/ca.crt \\
                                      --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key
    python -m fedml.flower supernode  --superlink superlink.example.org:9092 --data shoppers.npz \\
                                      --root-certificates certs/ca.crt [--partition-id 0 --num-partitions 4]
    python -m fedml.flower run        --superlink 127.0.0.1:9093 --root-certificates certs/ca.crt \\
                                      --config configs/movielens.toml --output-dir runs/1 --min-nodes 4

``--insecure`` instead of certificates: local trials only (no encryption, no server authentication).
``superlink`` and ``supernode`` replace this process with Flower's own (stop them by their PID).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedml.flower import commands
from fedml.flower.certs import TlsFiles


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


def _certs(args: argparse.Namespace) -> int:
    from fedml.flower.certs import generate_certificates

    files = generate_certificates(args.out, args.host, days=args.days)
    print(f"CA (give to SuperNodes and flwr run): {files.ca_cert}\nSuperLink: {files.server_cert} {files.server_key}")
    return 0


def _superlink(args: argparse.Namespace) -> int:
    security = None
    if not args.insecure:
        paths = [args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile]
        if not all(paths):
            raise SystemExit("superlink: give --ssl-ca-certfile, --ssl-certfile and --ssl-keyfile, or --insecure")
        security = TlsFiles(*(Path(_existing(p, "certificate")) for p in paths))
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    argv = commands.superlink_argv(
        args.state_dir, security, host=args.host, fleet_port=args.fleet_port, control_port=args.control_port,
        serverappio_port=args.serverappio_port,
    )  # fmt: skip
    return _exec(argv)


def _supernode(args: argparse.Namespace) -> int:
    argv = commands.supernode_argv(
        args.superlink, _existing(args.data, "--data"), _client_security(args), partition_id=args.partition_id,
        num_partitions=args.num_partitions, clientappio_port=args.clientappio_port,
    )  # fmt: skip
    return _exec(argv)


def _run(args: argparse.Namespace) -> int:
    from fedml.config import load_config
    from fedml.flower.app_project import RunSettings

    config = load_config(args.config, args.set)
    if args.secure_aggregation:
        config.federated.secure_aggregation = True
    settings = RunSettings(
        output_dir=str(Path(args.output_dir).resolve()), min_nodes=args.min_nodes, node_wait_s=args.node_wait_s,
        round_timeout_s=args.round_timeout_s,
    )  # fmt: skip

    def show(event: dict) -> None:
        if event["event"] == "round":
            eps = "" if event["epsilon"] is None else f" epsilon={event['epsilon']:.3f}"
            print(
                f"round {event['round']}: {event['clients_answered']}/{event['clients_sampled']} sampled shoppers "
                f"answered, loss={event['loss']:.4f}{eps}",
                flush=True,
            )
        elif event["event"] in ("started", "failed"):
            print({k: v for k, v in event.items() if k != "time"}, flush=True)

    run = commands.submit_run(args.superlink, _client_security(args), config, settings, on_event=show)
    print(f"model: {Path(args.output_dir) / 'model.npz'}")
    if run.statement is not None:
        print(f"privacy: epsilon={run.statement.epsilon:.4f} at delta={run.statement.delta:g} per shopper")
        print(f"mechanism: {run.statement.mechanism}")
    return 0


def _client_security(args: argparse.Namespace) -> Path | None:
    if args.insecure:
        return None
    if not args.root_certificates:
        raise SystemExit(f"{args.command}: give --root-certificates (the SuperLink's CA certificate), or --insecure")
    return Path(_existing(args.root_certificates, "--root-certificates"))


def _existing(path: str, what: str) -> str:
    if not Path(path).is_file():
        raise SystemExit(f"{what}: no such file {path}")
    return path


def _exec(argv: list[str]) -> int:
    print(" ".join(argv), flush=True)
    env = commands.flower_env(os.environ.get("FLWR_HOME"))
    os.execvpe(argv[0], argv, env)
    return 1  # not reached


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fedml.flower", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    certs = sub.add_parser("certs", help="self-signed CA and SuperLink certificate (trials)")
    certs.add_argument("--out", required=True)
    certs.add_argument("--host", action="append", required=True, help="a name or IP the SuperNodes dial (repeat)")
    certs.add_argument("--days", type=int, default=30)
    certs.set_defaults(handler=_certs)

    link = sub.add_parser("superlink", help="start the SuperLink (server side)")
    link.add_argument("--state-dir", required=True, help="where the SuperLink keeps its state database")
    link.add_argument("--host", default="0.0.0.0", help="address of the Fleet and Control APIs")
    link.add_argument("--fleet-port", type=int, default=commands.FLEET_PORT)
    link.add_argument("--control-port", type=int, default=commands.CONTROL_PORT)
    link.add_argument("--serverappio-port", type=int, default=commands.SERVERAPPIO_PORT)
    link.add_argument("--ssl-ca-certfile")
    link.add_argument("--ssl-certfile")
    link.add_argument("--ssl-keyfile")
    link.add_argument("--insecure", action="store_true", help="no TLS: local trials only")
    link.set_defaults(handler=_superlink)

    node = sub.add_parser("supernode", help="start a SuperNode (a device, or a device's shoppers)")
    node.add_argument("--superlink", required=True, help="the SuperLink's Fleet API, host:port")
    node.add_argument("--data", required=True, help="the node's shopper data file (.npz)")
    node.add_argument("--partition-id", type=int, default=0)
    node.add_argument("--num-partitions", type=int, default=1)
    node.add_argument("--clientappio-port", type=int, default=commands.CLIENTAPPIO_PORT)
    node.add_argument("--root-certificates", help="the SuperLink's CA certificate")
    node.add_argument("--insecure", action="store_true", help="no TLS: local trials only")
    node.set_defaults(handler=_supernode)

    run = sub.add_parser("run", help="train: submit our app to the SuperLink and follow it")
    run.add_argument("--superlink", required=True, help="the SuperLink's Control API, host:port")
    run.add_argument("--config", help="a run configuration TOML (configs/)")
    run.add_argument("--set", action="append", default=[], help="section.key=value override (repeat)")
    run.add_argument("--output-dir", required=True, help="where the ServerApp writes (on the SuperLink's machine)")
    run.add_argument("--min-nodes", type=int, default=1, help="SuperNodes to wait for before the first round")
    run.add_argument("--node-wait-s", type=float, default=120.0)
    run.add_argument("--round-timeout-s", type=float, default=300.0, help="a round waits no longer for replies")
    run.add_argument(
        "--secure-aggregation", action="store_true",
        help="Flower's SecAgg+: the server sees only the sum; devices clip (federated.secure_aggregation=true)",
    )  # fmt: skip
    run.add_argument("--root-certificates", help="the SuperLink's CA certificate")
    run.add_argument("--insecure", action="store_true", help="no TLS: local trials only")
    run.set_defaults(handler=_run)
    return parser


if __name__ == "__main__":
    sys.exit(main())
