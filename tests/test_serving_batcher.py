"""The serving API's micro-batcher: clients that come back join one batch; a quiet service never waits."""

from __future__ import annotations

import asyncio
import time

import pytest

from fedml.serving.api import MicroBatcher

COMPUTE_SECONDS = 0.02


def _slow_echo(batches: list[int]):
    def compute(requests: list[int]) -> list[int]:
        batches.append(len(requests))
        time.sleep(COMPUTE_SECONDS)  # a batch costs about the same whatever its size, as the fold-in does
        return [2 * r for r in requests]

    return compute


def _closed_loop(max_wait: float, clients: int = 6, rounds: int = 8, threads: int = 1) -> list[int]:
    """``clients`` that each ask, wait for the answer and ask again; the sizes of the batches computed."""
    batches: list[int] = []

    async def run() -> None:
        batcher = MicroBatcher(_slow_echo(batches), max_batch=32, threads=threads, max_wait=max_wait)

        async def client(c: int) -> None:
            for r in range(rounds):
                assert await batcher.submit(100 * c + r) == 2 * (100 * c + r)

        try:
            await asyncio.gather(*(client(c) for c in range(clients)))
        finally:
            batcher.close()

    asyncio.run(run())
    assert sum(batches) == clients * rounds
    return batches


def test_without_a_wait_returning_clients_split_into_lopsided_batches():
    batches = _closed_loop(max_wait=0.0)
    # the first request starts a batch alone, the rest form the next, and the two groups keep alternating
    assert batches[:4] == [1, 5, 1, 5]


def test_with_a_wait_returning_clients_are_answered_in_one_batch():
    batches = _closed_loop(max_wait=0.01)
    assert batches[0] == 1  # nobody was expected yet; the others queue behind it
    assert set(batches[1:-1]) == {6}  # from then on everyone at once: the first one is waited for
    assert batches[-1] == 5  # the first one finished a round early


def test_computing_in_the_event_loop_batches_the_same_way():
    assert _closed_loop(max_wait=0.0, threads=0)[:4] == [1, 5, 1, 5]
    batches = _closed_loop(max_wait=0.01, threads=0)
    assert batches[0] == 1 and set(batches[1:-1]) == {6} and batches[-1] == 5


def test_threads_zero_computes_in_the_event_loops_thread():
    import threading

    computed_on: list[int] = []

    def compute(requests: list[int]) -> list[int]:
        computed_on.append(threading.get_ident())
        if requests == [0]:
            raise ValueError("bad batch")
        return requests

    async def run() -> int:
        batcher = MicroBatcher(compute, max_batch=8, threads=0)
        try:
            with pytest.raises(ValueError, match="bad batch"):  # an error reaches the batch's requests
                await batcher.submit(0)
            assert await asyncio.gather(*(batcher.submit(r) for r in range(1, 4))) == [1, 2, 3]
        finally:
            batcher.close()
        return threading.get_ident()

    loop_thread = asyncio.run(run())
    assert set(computed_on) == {loop_thread}
    with pytest.raises(ValueError, match="threads must be >= 0"):
        MicroBatcher(compute, max_batch=8, threads=-1)


def test_a_quiet_service_does_not_wait_and_a_wait_that_times_out_is_not_repeated():
    batches: list[int] = []
    max_wait = 0.3

    async def timed(batcher: MicroBatcher, request: int) -> float:
        start = time.perf_counter()
        assert await batcher.submit(request) == 2 * request
        return time.perf_counter() - start

    async def run() -> tuple[float, float, float]:
        batcher = MicroBatcher(_slow_echo(batches), max_batch=32, max_wait=max_wait)
        try:
            alone = await timed(batcher, 1)  # first request: no batch to expect anyone from
            await asyncio.gather(*(batcher.submit(r) for r in range(4)))  # a batch of 1, then one of 3
            left_behind = await timed(batcher, 5)  # three were answered together: it waits for them in vain
            next_one = await timed(batcher, 6)  # after a wait that timed out, no wait
            return alone, left_behind, next_one
        finally:
            batcher.close()

    alone, left_behind, next_one = asyncio.run(run())
    assert alone < max_wait / 2 and next_one < max_wait / 2
    assert left_behind >= max_wait
    assert batches == [1, 1, 3, 1, 1]


def test_a_full_queue_starts_a_batch_without_waiting():
    batches: list[int] = []

    async def run() -> None:
        batcher = MicroBatcher(_slow_echo(batches), max_batch=4, max_wait=10.0)
        try:
            start = time.perf_counter()
            answers = await asyncio.gather(*(batcher.submit(r) for r in range(9)))
            assert answers == [2 * r for r in range(9)]
            assert time.perf_counter() - start < 1.0  # never the 10 s wait: each batch found max_batch waiting
        finally:
            batcher.close()

    asyncio.run(run())
    assert batches == [1, 4, 4]


def test_free_threads_share_the_waiting_requests():
    import threading

    batches: list[list[int]] = []
    gate = threading.Event()

    def compute(requests: list[int]) -> list[int]:
        batches.append(list(requests))
        gate.wait(5)
        return requests

    async def run() -> None:
        batcher = MicroBatcher(compute, max_batch=32, threads=2, max_wait=10.0)
        try:
            first = [asyncio.create_task(batcher.submit(r)) for r in range(8)]  # r0 and r1 start at once, 6 queue
            await asyncio.sleep(0.05)
            assert batches == [[0], [1]]
            gate.set()
            await asyncio.gather(*first[:2])
            await asyncio.sleep(0.05)  # both threads free: each expects 1 + 6 back, 6 wait
            assert len(batches) == 2
            second = asyncio.create_task(batcher.submit(8))  # 7 waiting: the first free thread takes its half
            await asyncio.sleep(0.05)
            assert batches[2] == [2, 3, 4, 5]
            await asyncio.wait_for(asyncio.gather(*first[2:6]), 5)
            assert all(not t.done() for t in first[6:])  # the rest wait to fill the other thread's batch
            second.cancel()
        finally:
            batcher.close()

    asyncio.run(run())


def test_the_command_line_computes_in_the_event_loop_with_several_workers(tmp_path, monkeypatch):
    import os

    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # the module sets them
        monkeypatch.setenv(name, os.environ[name]) if name in os.environ else monkeypatch.delenv(name, raising=False)
    from fedml.serving.__main__ import parse_args

    assert parse_args(["--model-dir", str(tmp_path), "--workers", "2"]).compute_threads == 0
    assert parse_args(["--model-dir", str(tmp_path)]).compute_threads == 1
    assert parse_args(["--model-dir", str(tmp_path), "--workers", "2", "--compute-threads", "1"]).compute_threads == 1
    with pytest.raises(SystemExit):
        parse_args(["--model-dir", str(tmp_path), "--compute-threads", "-1"])
