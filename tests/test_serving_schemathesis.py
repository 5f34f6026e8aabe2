"""The serving API against its own OpenAPI schema (schemathesis 4), and its request size limit.

schemathesis reads ``/openapi.json`` from the app (in process, over ASGI, lifespan started once) and
generates requests for every operation: examples, boundary values (its coverage phase) and random
fuzzing, both valid and invalid (negative) data. Every response must pass its default checks: no
5xx, status codes and content types the schema declares, bodies that match the response schemas,
invalid data refused and valid data accepted. ``POST /recommend`` runs with its bearer token set.

The size limit is checked in process and on a real socket (uvicorn), with Content-Length and with
chunked bodies that declare no length.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import given, settings
from hypothesis import strategies as st

from fedml.serving.api import ServiceSettings, create_app
from fedml.serving.source import StaticSource
from tests.conftest import free_port
from tests.test_serving_api import ITEMS, clustered

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOKEN = "schemathesis-t0ken"
LIMIT = ServiceSettings().max_body_bytes
#: schemathesis examples per operation and generation phase (docs/reliability.md reports the counts)
MAX_EXAMPLES = 150

APP = create_app(
    StaticSource(clustered(0), name="shopping-guide", version="3", tags={"privacy.epsilon": "2.0"}),
    ServiceSettings(token=TOKEN, poll_seconds=3600),
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.generation.update(max_examples=MAX_EXAMPLES)
# invalid data that is also over the size limit is refused with 413 before it is parsed (found by a run that
# generated long item ids): a refusal, as the negative-data check means it
_rejection = schema.config.checks.negative_data_rejection
_rejection.expected_statuses = [*_rejection.expected_statuses, "413"]
CASES: Counter[str] = Counter()
STATUSES: Counter[int] = Counter()


@schema.parametrize()
def test_every_operation_conforms_and_never_errors(case) -> None:
    response = case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
    CASES[f"{case.method} {case.path}"] += 1
    STATUSES[response.status_code] += 1
    assert response.status_code < 500, response.text


def test_the_fuzzing_ran() -> None:
    """Guards against a vacuous pass (e.g. an empty schema): every operation got many cases, none a 5xx."""
    if not CASES:
        pytest.skip("run together with test_every_operation_conforms_and_never_errors")
    assert {"POST /recommend", "GET /items", "GET /healthz", "GET /readyz", "GET /version"} <= set(CASES)
    assert CASES["POST /recommend"] >= MAX_EXAMPLES and CASES["GET /items"] >= MAX_EXAMPLES
    assert not [status for status in STATUSES if status >= 500]
    assert {200, 422} <= set(STATUSES)  # valid requests answered, invalid ones refused
    print(f"schemathesis: {sum(CASES.values())} requests {dict(CASES)} statuses {dict(STATUSES)}")


def test_error_answers_match_the_declared_schema() -> None:
    """Regression (found here): the 400 for an unparseable body was undeclared, and the declared 422 body
    (FastAPI's default: detail a list) was not what the service sends (detail text + errors)."""
    from fastapi.testclient import TestClient

    from fedml.serving.api import ErrorDetail, InvalidRequest

    responses = APP.openapi()["paths"]["/recommend"]["post"]["responses"]
    assert responses["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/InvalidRequest")
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorDetail")
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    with TestClient(APP) as client:
        unparseable = client.post("/recommend", content=b"\x80\x81", headers=headers)  # not UTF-8
        invalid = client.post("/recommend", json={"items": [], "k": 0}, headers=headers)
    assert unparseable.status_code == 400 and ErrorDetail.model_validate(unparseable.json())
    assert invalid.status_code == 422 and InvalidRequest.model_validate(invalid.json()).errors[0].field == "body.k"


@pytest.mark.parametrize(("k", "status"), [(True, 422), ("5", 422), (5.0, 200), (5, 200), (5.5, 422)])
def test_k_is_an_integer_as_the_schema_says(k: object, status: int) -> None:
    """Regression (found here): pydantic's lax int took ``"k": true`` as k=1 and ``"5"`` as 5, though the
    schema says integer; schemathesis flagged the accepted invalid request."""
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        response = client.post(
            "/recommend", json={"items": [ITEMS[0]], "k": k}, headers={"authorization": f"Bearer {TOKEN}"}
        )
    assert response.status_code == status, response.text
    if status == 422:
        assert [e["field"] for e in response.json()["errors"]] == ["body.k"]


# ---------------------------------------------------------------------- size limit, in process


def _post_raw(body: bytes, chunked: bool) -> int:
    """Status of ``POST /recommend`` with ``body``, declared (Content-Length) or streamed in chunks."""
    from fastapi.testclient import TestClient

    with TestClient(APP) as client:
        headers = {"content-type": "application/json", "authorization": f"Bearer {TOKEN}"}
        if chunked:
            content = (body[i : i + 1000] for i in range(0, len(body), 1000))
            return client.post("/recommend", content=content, headers=headers).status_code
        return client.post("/recommend", content=body, headers=headers).status_code


def _body(size: int) -> bytes:
    """A valid request padded with spaces to exactly ``size`` bytes."""
    core = json.dumps({"items": [ITEMS[0]], "k": 3}).encode()
    return core + b" " * (size - len(core))


@settings(max_examples=25, deadline=None)
@given(size=st.one_of(st.integers(100, 3 * LIMIT), st.sampled_from([LIMIT - 1, LIMIT, LIMIT + 1])),
       chunked=st.booleans())  # fmt: skip
def test_bodies_over_the_limit_get_413_and_the_rest_are_served(size: int, chunked: bool) -> None:
    status = _post_raw(_body(size), chunked)
    assert status == (413 if size > LIMIT else 200)


# ---------------------------------------------------------------------- size limit, on a real socket


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, str]]:
    """The real service process (uvicorn) on a model folder; yields (port, log path)."""
    folder = tmp_path_factory.mktemp("schemathesis-service")
    model_dir = clustered(0).save(folder / "model")
    port, log = free_port(), folder / "serve.log"
    env = {**os.environ, "FEDML_SERVE_TOKEN": TOKEN}
    args = [sys.executable, "-m", "fedml.serving", "--model-dir", str(model_dir), "--port", str(port)]
    with log.open("w") as handle:
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=folder)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.3)
        yield port, str(log)
    finally:
        process.terminate()
        process.wait(timeout=30)


def _raw_exchange(port: int, head: bytes, chunks: list[bytes]) -> int:
    """Send a request by hand (so nothing adds a Content-Length) and return the response status."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer 413 and close before the rest arrives
        status_line = sock.makefile("rb").readline()
    return int(status_line.split()[1])


def _head(extra: str) -> bytes:
    return (
        "POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {TOKEN}\r\nConnection: close\r\n{extra}\r\n"
    ).encode()


@pytest.mark.integration
@pytest.mark.parametrize(("size", "expected"), [(LIMIT, 200), (LIMIT + 1, 413), (10 * LIMIT, 413)])
def test_real_server_limits_chunked_bodies_without_content_length(service, size: int, expected: int) -> None:
    port, _ = service
    body = _body(size)
    chunks = [b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096]) for i in range(0, len(body), 4096)]
    assert _raw_exchange(port, _head("Transfer-Encoding: chunked\r\n"), [*chunks, b"0\r\n\r\n"]) == expected


@pytest.mark.integration
def test_real_server_refuses_a_declared_length_over_the_limit_before_reading_it(service) -> None:
    port, _ = service
    # only the head is sent: the 413 must come from the declared length alone
    assert _raw_exchange(port, _head(f"Content-Length: {100 * LIMIT}\r\n"), []) == 413
