"""Soak test of the serving API: ``python -m bench.serve_soak --duration 60`` (writes bench/results/serve_soak.json).

The service and load of ``bench/serve.py`` (a 50,000-item recommender served by ``python -m
fedml.serving --model-dir``, requests at k=10 from short one-cluster histories, keep-alive
connections with a fixed number in flight), held for ``--duration`` seconds in one layout instead
of a sweep. It reports failed requests (any answer but 200, a timeout or a broken connection: the
guarantee is zero), throughput and latency percentiles, against ``bench.serve.TARGET``. The exit
status is 1 when a request failed or the load ran out before the duration.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from bench.serve import ROOT, TARGET, build_recommender, histories, layout, machine, serve_and_load

#: sessions are generated for this rate over the whole duration, so the load cannot run out first
MAX_RATE = 4000


def soak(args: argparse.Namespace) -> dict:
    """Start the service, warm it up, hold the load for ``args.duration`` seconds; the report."""
    workers, threads = args.workers
    recommender, cluster = build_recommender(args.items, args.dim, args.clusters, args.seed)
    sessions = histories(cluster, args.warmup + math.ceil(args.duration * MAX_RATE), args.max_history, args.seed + 1)
    run_args = argparse.Namespace(**vars(args), time_limit=args.duration)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        model_dir = recommender.save(Path(tmp) / "model")
        log = Path(tmp) / "serve.log"
        outcome = serve_and_load(model_dir, recommender, sessions, workers, args.concurrency, run_args, log, threads)
        service_errors = [line for line in log.read_text().splitlines() if "Traceback" in line or " 500 " in line]
    full = outcome["duration_s"] >= 0.98 * args.duration
    return {
        "benchmark": "serving API soak, POST /recommend on loopback",
        "duration_s": args.duration,
        "catalogue_items": args.items,
        "k": args.k,
        "failed_requests": outcome["errors"],
        "requests": outcome["requests"],
        "throughput_rps": outcome["throughput_rps"],
        "latency_ms": outcome["latency_ms"],
        "ran_full_duration": full,
        "service_log_errors": len(service_errors),
        "target": TARGET,
        "met_target": outcome["errors"] == 0
        and outcome["throughput_rps"] >= TARGET["throughput_rps"]
        and outcome["latency_ms"]["p99"] < TARGET["p99_ms"],
        "run": outcome,
        "machine": machine(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: %(default)s)")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--workers", type=layout, default=layout("2"), help="W or WxT, as in bench/serve.py")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--compute-threads", type=int, help="as in bench/serve.py (default: the service's)")
    parser.add_argument("--batch-wait-ms", type=float, help="the service's --batch-wait-ms (default: the service's)")
    parser.add_argument("--max-history", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve_soak.json")
    args = parser.parse_args(argv)
    if args.duration <= 0:
        parser.error("--duration must be > 0")
    report = soak(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    latency = report["latency_ms"]
    print(f"{report['requests']} requests in {report['run']['duration_s']:.1f} s: {report['failed_requests']} failed, "
          f"{report['throughput_rps']:.0f} req/s, p50 {latency['p50']} ms, p99 {latency['p99']} ms -> {args.out}")  # fmt: skip
    return 0 if report["failed_requests"] == 0 and report["ran_full_duration"] else 1


if __name__ == "__main__":
    sys.exit(main())
