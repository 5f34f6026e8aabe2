"""Serve the shopping guide: ``python -m fedml.serving --model shopping-guide --alias production``.

The model comes from the MLflow registry at ``MLFLOW_TRACKING_URI`` (``--model`` / ``--alias``), or
from a folder written by ``Recommender.save`` (``--model-dir``). ``FEDML_SERVE_TOKEN``, when set, is
the bearer token that ``POST /recommend`` requires. With ``--workers N`` each worker process loads
the model and polls for new versions on its own.
"""

from __future__ import annotations

import os

# One BLAS thread per process, set before numpy loads: the service's parallelism is its workers and
# batches, and idle BLAS threads spinning for work took CPU from the request path.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

from fedml.redaction import redacted  # noqa: E402
from fedml.serving.api import ServiceSettings, default_compute_threads  # noqa: E402

CONFIG_ENV = "FEDML_SERVE_CONFIG"  # how the options reach each worker process
TOKEN_ENV = "FEDML_SERVE_TOKEN"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServiceSettings()
    parser = argparse.ArgumentParser(prog="python -m fedml.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shopping-guide", help="registered model name (default: %(default)s)")
    parser.add_argument("--alias", default="production", help="registry alias to serve (default: %(default)s)")
    parser.add_argument("--model-dir", help="serve a folder written by Recommender.save instead of the registry")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: %(default)s)")
    parser.add_argument("--poll-seconds", type=float, default=defaults.poll_seconds,
                        help="how often to look for a new version (default: %(default)s)")  # fmt: skip
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch)
    parser.add_argument("--compute-threads", type=int,
                        help="batches computed at once per worker, each on its own thread; 0: in the worker's "
                             "event loop thread (default: 0 with several workers, one per core; else 1)")  # fmt: skip
    parser.add_argument("--batch-wait-ms", type=float, default=defaults.batch_wait_ms,
                        help="how long a free compute thread waits for a fuller batch, 0: never (default: %(default)s)")  # fmt: skip
    parser.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per worker (default: 1)")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    args = parser.parse_args(argv)
    if not args.model_dir and not os.environ.get("MLFLOW_TRACKING_URI"):
        parser.error(
            "set MLFLOW_TRACKING_URI to the tracking server (the pipeline's embedded store is "
            "sqlite:///$PWD/.fedml/mlflow.db; `make serve` uses it by default), or give --model-dir"
        )
    if args.compute_threads is None:
        args.compute_threads = default_compute_threads(args.workers)
    if min(args.workers, args.max_batch, args.torch_threads) < 1 or args.compute_threads < 0 or args.poll_seconds <= 0:
        parser.error(
            "--workers, --max-batch and --torch-threads must be >= 1, --compute-threads >= 0, --poll-seconds > 0"
        )
    if args.batch_wait_ms < 0:
        parser.error(f"--batch-wait-ms must be >= 0, got {args.batch_wait_ms}")
    return args


def create_app_from_environment(preload: bool = False) -> Any:
    """The app factory uvicorn calls in its process; options come from ``FEDML_SERVE_CONFIG``.

    ``preload``: gunicorn's master calls it before forking the workers, and the first model load
    happens there, so that the workers share its memory (one copy of the item table in the
    processor's cache instead of one per worker).
    """
    import torch

    from fedml.serving.api import create_app
    from fedml.serving.source import DirectorySource

    config = json.loads(os.environ[CONFIG_ENV])
    # one thread in a process that forks (OpenMP's threads do not survive a fork); workers set theirs
    torch.set_num_threads(1 if preload else config["torch_threads"])
    # model swaps and failed reloads go to the log next to uvicorn's lines
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if config.get("model_dir"):
        source = DirectorySource(config["model_dir"], name=config["model"])
    else:
        from fedml.serving.registry import RegistrySource

        source = RegistrySource(config["model"], config["alias"], tracking_uri=os.environ.get("MLFLOW_TRACKING_URI"))
    settings = ServiceSettings(
        token=os.environ.get(TOKEN_ENV) or None,
        poll_seconds=config["poll_seconds"],
        max_batch=config["max_batch"],
        compute_threads=config["compute_threads"],
        batch_wait_ms=config["batch_wait_ms"],
    )
    return create_app(source, settings, preload=preload)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = parse_args(argv)
    os.environ[CONFIG_ENV] = json.dumps({
        "model": args.model, "alias": args.alias, "model_dir": args.model_dir, "poll_seconds": args.poll_seconds,
        "max_batch": args.max_batch, "compute_threads": args.compute_threads, "torch_threads": args.torch_threads,
        "batch_wait_ms": args.batch_wait_ms,
    })  # fmt: skip
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per reload in the log
    source = args.model_dir or f"models:/{args.model}@{args.alias} at {redacted(os.environ['MLFLOW_TRACKING_URI'])}"
    print(f"serving {source} on http://{args.host}:{args.port} ({args.workers} worker(s))", file=sys.stderr, flush=True)
    if args.workers > 1:
        _serve_with_gunicorn(args)
    else:
        uvicorn.run(
            "fedml.serving.__main__:create_app_from_environment", factory=True, host=args.host, port=args.port,
            access_log=args.access_log, log_level="info",
        )  # fmt: skip
    return 0


def _serve_with_gunicorn(args: argparse.Namespace) -> None:
    """Several uvicorn worker processes under gunicorn (``SO_REUSEPORT``). Under uvicorn's own
    multi-worker mode two workers used one core between them on an idle 2-core machine (the load was
    not spread over the workers); under gunicorn they use both (bench/serve.py). The app and its
    first model are loaded once, before the workers are forked (``preload_app``): they share the
    item table's memory until a new version arrives (each worker loads that one on its own)."""
    from gunicorn.app.base import BaseApplication

    def post_fork(server: Any, worker: Any) -> None:
        import torch

        torch.set_num_threads(args.torch_threads)

    class Service(BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": f"{args.host}:{args.port}", "workers": args.workers, "reuse_port": True,
                "worker_class": "uvicorn.workers.UvicornWorker", "accesslog": "-" if args.access_log else None,
                "loglevel": "info", "graceful_timeout": 10, "preload_app": True, "post_fork": post_fork,
            }.items():  # fmt: skip
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app_from_environment(preload=True)

    Service().run()


if __name__ == "__main__":
    sys.exit(main())
