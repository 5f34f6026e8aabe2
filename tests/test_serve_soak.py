"""The serving soak test (bench/serve_soak.py) in a short run: the real service under load, nothing failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import serve_soak


@pytest.mark.integration
def test_a_short_soak_counts_every_request_and_none_fails(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    args = ["--duration", "3", "--items", "1000", "--clusters", "20", "--warmup", "20", "--concurrency", "4",
            "--workers", "1", "--out", str(out)]  # fmt: skip
    assert serve_soak.main(args) == 0
    report = json.loads(out.read_text())
    assert report["failed_requests"] == 0 and report["service_log_errors"] == 0 and report["ran_full_duration"]
    run = report["run"]
    assert run["status_counts"] == {"200": run["requests"]} and run["requests"] > 20
    assert report["throughput_rps"] == pytest.approx(run["requests"] / run["duration_s"], rel=0.01)
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert run["same_items_as_converged_fold_in"].endswith("/20")  # answers were checked before the load
