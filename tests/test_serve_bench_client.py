"""The serving benchmark's load generator counts every request, its status and its errors honestly."""

from __future__ import annotations

import asyncio

from bench.serve import load


async def _serve(handle_body) -> tuple[asyncio.AbstractServer, int, list[int]]:  # noqa: ANN001
    """A minimal HTTP/1.1 server on loopback; ``handle_body(body)`` gives (status, close) or None to hang up.

    Returns the server, its port, and for each connection the most requests it had outstanding at once.
    """
    outstanding: list[int] = []

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        mine = len(outstanding)
        outstanding.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                # anything already buffered would be a pipelined request: the client must wait for the answer
                outstanding[mine] = max(outstanding[mine], 1 + (len(reader._buffer) > 0))  # noqa: SLF001
                answer = handle_body(body)
                if answer is None:
                    return  # hang up without an answer
                status, close = answer
                payload = b'{"ok": true}'
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(payload)}\r\n".encode()
                    + (b"connection: close\r\n" if close else b"")
                    + b"\r\n"
                    + payload
                )
                await writer.drain()
                if close:
                    return
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], outstanding


def test_every_request_is_counted_with_its_status_and_broken_connections_are_errors():
    bodies = [
        f'{{"n": {i}, "kind": "{kind}"}}'.encode()
        for i, kind in enumerate(["ok"] * 4 + ["drop"] * 3 + ["bye"] * 2 + ["busy"] * 5 + ["ok"] * 36)
    ]

    def handle(body: bytes):  # noqa: ANN202
        if b'"drop"' in body:
            return None
        if b'"busy"' in body:
            return 503, False
        return 200, b'"bye"' in body

    async def run() -> tuple[dict, list[int]]:
        server, port, outstanding = await _serve(handle)
        async with server:
            outcome = await load(f"http://127.0.0.1:{port}/recommend", bodies, concurrency=4, time_limit=30)
        return outcome, outstanding

    outcome, outstanding = asyncio.run(run())
    assert outcome["requests"] == len(bodies)
    assert outcome["status_counts"]["200"] == 42  # 40 ok + 2 answered with "connection: close"
    assert outcome["status_counts"]["503"] == 5
    assert outcome["status_counts"]["IncompleteReadError"] == 3  # hung up: an error, and a new connection
    assert outcome["errors"] == 8
    assert len(outstanding) == 4 + 3 + 2  # one per worker, and a new one after each hang-up and each close
    assert max(outstanding) == 1  # never more than one request at a time on a connection


def test_a_request_that_gets_no_answer_in_time_is_a_timeout_error(monkeypatch):
    import bench.serve

    real_timeout = asyncio.timeout
    monkeypatch.setattr(bench.serve.asyncio, "timeout", lambda seconds: real_timeout(0.2))

    async def run() -> dict:
        server, port, _ = await _serve(lambda body: (200, False))
        stalled = asyncio.Event()

        async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await stalled.wait()

        silent = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        async with server, silent:
            good = await load(f"http://127.0.0.1:{port}/recommend", [b"{}"] * 3, concurrency=1, time_limit=30)
            bad = await load(f"http://127.0.0.1:{silent.sockets[0].getsockname()[1]}/recommend", [b"{}"] * 2, 1, 30)
            stalled.set()
        return {"good": good, "bad": bad}

    outcome = asyncio.run(run())
    assert outcome["good"]["status_counts"] == {"200": 3} and outcome["good"]["errors"] == 0
    assert outcome["bad"]["status_counts"] == {"TimeoutError": 2} and outcome["bad"]["errors"] == 2
    assert outcome["bad"]["latency_ms"]["p50"] >= 150  # the wait is part of the recorded latency


def test_the_benchmark_summarises_each_configuration_by_its_medians() -> None:
    from bench.serve import headline_order, summarise

    def run(rps: float, p99: float, errors: int = 0, workers: int = 2, concurrency: int = 12) -> dict:
        return {"server_workers": workers, "compute_threads": 0, "concurrency": concurrency, "throughput_rps": rps,
                "latency_ms": {"p50": p99 / 2, "p99": p99}, "errors": errors, "cpu": {"server_cores": 1.9},
                "connections_per_worker": [6, 6]}  # fmt: skip

    rows = summarise([run(1300, 18), run(900, 25), run(1200, 19), run(2000, 10, concurrency=8, errors=1)])
    at_12, at_8 = rows
    assert (at_12["throughput_rps"], at_12["latency_ms"]["p99"], at_12["runs"]) == (1200, 19, 3)
    assert at_12["meets_target"] and at_12["runs_meeting_target"] == 2  # the medians meet it, one run did not
    assert not at_8["meets_target"] and at_8["runs_meeting_target"] == 0  # an error fails it whatever the speed
    # the headline: a configuration that meets the target, the one whose runs met it most often first
    steady, faster = summarise([run(1100, 15, concurrency=8)] * 3 + [run(1400, 19.5), run(1500, 19), run(1300, 21)])
    assert faster["meets_target"] and faster["runs_meeting_target"] == 2 and steady["runs_meeting_target"] == 3
    assert max([faster, at_8, steady], key=headline_order) is steady
