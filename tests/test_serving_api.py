"""The shopping guide over HTTP: the app on an in-memory recommender, and the real service process
against the session's MLflow server, picking up a new production version without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from fedml.data.ids import IdMap
from fedml.models.mf import ItemTable
from fedml.serving.api import ServiceSettings, create_app
from fedml.serving.recommender import Recommender, ServingIndex
from fedml.serving.source import DirectorySource, ModelSlot, StaticSource
from tests.conftest import free_port

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLUSTERS, PER_CLUSTER, DIM = 4, 10, 8
ITEMS = [f"sku-{i:03d}" for i in range(CLUSTERS * PER_CLUSTER)]  # sku-000..009 cluster 0, ...


def clustered(seed: int, n_clusters: int = CLUSTERS, per_cluster: int = PER_CLUSTER, dim: int = DIM) -> Recommender:
    """Items in ``n_clusters`` tight groups of ``per_cluster`` along separate directions."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.eye(max(dim, n_clusters))[:n_clusters, :dim]
    embeddings = centres.repeat_interleave(per_cluster, 0) + 0.3 * torch.randn(
        n_clusters * per_cluster, dim, generator=generator
    )
    bias = 0.5 * torch.randn(n_clusters * per_cluster, generator=generator) - 1.0
    items = [f"sku-{i:03d}" for i in range(n_clusters * per_cluster)]
    return Recommender(ItemTable(embeddings, bias), IdMap(users=[], items=items), fold_in_iterations=12)


@pytest.fixture(scope="module")
def recommender() -> Recommender:
    return clustered(0)


@pytest.fixture
def client(recommender: Recommender):
    app = create_app(StaticSource(recommender, name="shopping-guide", version="7", tags={"privacy.epsilon": "2.5"}))
    with TestClient(app) as client:
        yield client


def post(client: TestClient, body: object, **kwargs):
    return client.post("/recommend", json=body, **kwargs)


# ---------------------------------------------------------------------- the hot path


def test_a_batch_answers_each_request_as_the_recommender_alone_would():
    rec = clustered(1, n_clusters=20, per_cluster=150, dim=16)
    rng = np.random.default_rng(0)
    histories = [
        rec.ids.item_ids(rng.integers(c * 150, (c + 1) * 150, size=m))
        for c, m in zip(range(20), rng.integers(1, 15, 20))
    ]
    histories += [[], ["nope", histories[0][0]]]
    ks = [int(k) for k in rng.integers(1, 30, len(histories))]
    batched = ServingIndex(rec).recommend_many(histories, ks)
    for history, k, got in zip(histories, ks, batched):
        indices = rec.ids.item_index(history, errors="ignore")
        alone = rec.score([np.unique(indices[indices >= 0])])[0]
        seen = set(history)
        expected = [i for i in torch.argsort(alone, descending=True).tolist() if rec.ids.items[i] not in seen][:k]
        assert got.items == rec.ids.item_ids(expected)
        assert got.scores == pytest.approx(alone[expected].tolist(), rel=1e-5, abs=1e-5)
        assert got.unknown_items == [h for h in history if h == "nope"]


def test_because_names_the_history_item_most_like_the_recommendation(recommender):
    index = ServingIndex(recommender)
    history = ["sku-001", "sku-025"]  # one item of cluster 0, one of cluster 2
    (rec,) = index.recommend_many([history], [12])
    q = recommender.table.embeddings
    for item, because in zip(rec.items, rec.because):
        i = recommender.ids.item_index([item])[0]
        dots = {h: float(q[i] @ q[recommender.ids.item_index([h])[0]]) for h in history}
        assert because == max(dots, key=dots.get)
    assert {b for b in rec.because} == set(history)  # both clusters are recommended, each for its own reason


# ---------------------------------------------------------------------- POST /recommend


def test_recommend_answers_like_the_recommender(client, recommender):
    response = post(client, {"items": ["sku-001", "sku-003", "no-such-sku"], "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = recommender.recommend(["sku-001", "sku-003"], k=5)
    assert [r["item"] for r in body["items"]] == expected.items
    assert [r["score"] for r in body["items"]] == pytest.approx(expected.scores, abs=1e-3)
    assert set(expected.items) <= {f"sku-{i:03d}" for i in range(PER_CLUSTER)} - {"sku-001", "sku-003"}
    assert body["unknown_items"] == ["no-such-sku"]
    assert body["model"] == {"name": "shopping-guide", "version": "7"}
    for row in body["items"]:
        assert row["because"] in ("sku-001", "sku-003")
        assert row["reason"] == f"because you viewed {row['because']}"


def test_cold_start_and_only_unknown_items(client, recommender):
    cold = post(client, {"items": [], "k": 3}).json()
    assert [r["item"] for r in cold["items"]] == recommender.recommend([], k=3).items
    assert all(r["because"] is None and r["reason"] == "popular in the shop" for r in cold["items"])
    unknown = post(client, {"items": ["x", "y"]}).json()  # k defaults to 10
    assert unknown["unknown_items"] == ["x", "y"] and len(unknown["items"]) == 10


def test_k_larger_than_the_unseen_catalogue(client):
    history = ITEMS[:35]
    body = post(client, {"items": history, "k": 100}).json()
    assert sorted(r["item"] for r in body["items"]) == ITEMS[35:]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(recommender):
    import asyncio

    import httpx

    app = create_app(StaticSource(recommender), ServiceSettings(max_batch=8))
    histories = [[ITEMS[i], ITEMS[(i * 7) % len(ITEMS)]] for i in range(20)]
    batches: list[int] = []

    async def run() -> list[dict]:
        original = ServingIndex.recommend_many

        def spy(self, histories, ks):
            batches.append(len(histories))
            return original(self, histories, ks)

        ServingIndex.recommend_many = spy
        try:
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                    answers = await asyncio.gather(
                        *[http.post("/recommend", json={"items": h, "k": 4}) for h in histories]
                    )
        finally:
            ServingIndex.recommend_many = original
        return [a.json() for a in answers]

    answers = asyncio.run(run())
    for history, answer in zip(histories, answers):
        assert [r["item"] for r in answer["items"]] == recommender.recommend(history, k=4).items
    assert max(batches) > 1 and max(batches) <= 8 and sum(batches) == len(histories)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"items": ["sku-001"], "k": 0}, "body.k"),
        ({"items": ["sku-001"], "k": 101}, "body.k"),
        ({"items": ["sku-001"], "k": "ten"}, "body.k"),
        ({"items": "sku-001"}, "body.items"),
        ({"items": [""]}, "body.items.0"),
        ({"items": ["a" * 201]}, "body.items.0"),
        ({"items": ["sku-001"] * 201}, "body.items"),
        ({"k": 3}, "body.items"),
        ({"items": [], "colour": "red"}, "body.colour"),
    ],
)
def test_bad_requests_get_422_naming_the_field(client, body, field):
    response = post(client, body)
    assert response.status_code == 422
    detail = response.json()
    assert detail["detail"].startswith("invalid request: ")
    assert field in [e["field"] for e in detail["errors"]], detail


def test_malformed_json_and_oversized_bodies(client):
    broken = client.post("/recommend", content=b'{"items": [', headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "invalid request" in broken.json()["detail"]
    huge = json.dumps({"items": ["sku-001"] * 5000}).encode()  # 55 kB > the 32 KiB limit
    too_large = client.post("/recommend", content=huge, headers={"content-type": "application/json"})
    assert too_large.status_code == 413 and "32768 bytes" in too_large.json()["detail"]

    def chunks():  # no Content-Length: counted while it arrives
        for _ in range(10):
            yield b" " * 4000
        yield huge

    streamed = client.post("/recommend", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_bearer_token_guards_recommend_only(recommender):
    app = create_app(StaticSource(recommender), ServiceSettings(token="s3cret"))
    with TestClient(app) as client:
        assert post(client, {"items": []}).status_code == 401
        wrong = post(client, {"items": []}, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert post(client, {"items": []}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/items").status_code == 200


# ---------------------------------------------------------------------- the other endpoints


def test_health_readiness_version_and_openapi(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "model": "shopping-guide", "version": "7"}
    version = client.get("/version").json()
    assert version["version"] == "7" and version["n_items"] == len(ITEMS)
    assert version["privacy"] == {"privacy.epsilon": "2.5"} and version["reload_error"] is None
    schema = client.get("/openapi.json").json()
    assert {"/recommend", "/items", "/healthz", "/readyz", "/version"} <= set(schema["paths"])
    request_schema = schema["components"]["schemas"]["RecommendRequest"]["properties"]
    assert request_schema["k"]["maximum"] == 100 and request_schema["items"]["maxItems"] == 200


def test_items_pages_and_search(client):
    first = client.get("/items", params={"limit": 15}).json()
    assert first == {"total": len(ITEMS), "offset": 0, "limit": 15, "items": ITEMS[:15]}
    last = client.get("/items", params={"offset": 30, "limit": 15}).json()
    assert last["items"] == ITEMS[30:]
    found = client.get("/items", params={"q": "SKU-01"}).json()
    assert found["items"] == [f"sku-{i:03d}" for i in range(10, 20)] and found["total"] == 10
    assert client.get("/items", params={"limit": 0}).status_code == 422
    assert client.get("/items", params={"limit": 201}).status_code == 422


def test_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200
    # nothing is loaded from another host: the machine may be offline
    assert "http://" not in page.text and "https://" not in page.text


def test_not_ready_until_a_model_exists():
    source = StaticSource(None, name="shopping-guide")
    app = create_app(source, ServiceSettings(poll_seconds=3600))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        not_ready = client.get("/readyz")
        assert not_ready.status_code == 503 and "no model loaded" in not_ready.json()["detail"]
        assert post(client, {"items": []}).status_code == 503
        assert client.get("/version").json()["version"] is None


# ---------------------------------------------------------------------- reloading


class FlakySource(StaticSource):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fail_loads = False

    def load(self, version: str):
        if self.fail_loads:
            raise OSError("artifact store unreachable")
        return super().load(version)


def test_new_version_is_swapped_in_and_a_failed_load_keeps_the_old_one():
    first, second = clustered(0), clustered(5)
    source = FlakySource(first, version="1")
    slot = ModelSlot(source)
    assert slot.refresh() and slot.served_version == "1"
    assert not slot.refresh()  # same version: nothing loaded
    source.publish("2", second)
    source.fail_loads = True
    assert not slot.refresh()
    assert slot.served_version == "1" and "artifact store unreachable" in slot.last_error
    source.fail_loads = False
    assert slot.refresh() and slot.served_version == "2" and slot.last_error is None
    assert slot.model.recommender is second


def test_the_app_polls_its_source(recommender):
    source = StaticSource(recommender, version="1")
    app = create_app(source, ServiceSettings(poll_seconds=0.05))
    with TestClient(app) as client:
        assert post(client, {"items": ["sku-011"], "k": 3}).json()["model"]["version"] == "1"
        other = clustered(9)
        source.publish("2", other)
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["version"] != "2":
            assert time.monotonic() < deadline, "new version not picked up"
            time.sleep(0.05)
        answer = post(client, {"items": ["sku-011"], "k": 3}).json()
        assert answer["model"]["version"] == "2"
        assert [r["item"] for r in answer["items"]] == other.recommend(["sku-011"], k=3).items


def test_directory_source_versions_by_file(tmp_path, recommender):
    source = DirectorySource(tmp_path / "model", name="shop")
    assert source.current_version() is None
    recommender.save(tmp_path / "model")
    version = source.current_version()
    loaded = source.load(version)
    assert loaded.name == "shop" and loaded.recommender.ids.items == ITEMS


# ---------------------------------------------------------------------- the real service on the real registry


def _get(url: str, token: str | None = None, body: dict | None = None) -> dict:
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode())
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, KeyError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"{what} within {timeout:.0f} s; service log:\n{log.read_text()[-3000:]}")


@pytest.mark.integration
def test_service_serves_production_and_follows_the_alias_without_restart(servers, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from flows import tracking

    uri = servers["mlflow"].url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    name = f"serving-test-{os.getpid()}"
    client = tracking.connect()
    run_id = tracking.start_run(client, "serving-test", "register-two", {})
    first, second = clustered(0), clustered(7)
    body = {"items": ["sku-001", "sku-022"], "k": 6}
    assert first.recommend(body["items"], k=6).items != second.recommend(body["items"], k=6).items  # tellable apart
    v1 = tracking.log_and_register_model(
        client, run_id, first, name, {"privacy.epsilon": "1.5", "privacy.unit": "user"}
    )
    v2 = tracking.log_and_register_model(
        client, run_id, second, name, {"privacy.epsilon": "3.0", "privacy.unit": "user"}
    )
    registry = MlflowClient(tracking_uri=uri, registry_uri=uri)
    registry.set_registered_model_alias(name, "production", v1)

    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "FEDML_SERVE_TOKEN": "t0ken"}
    args = [sys.executable, "-m", "fedml.serving", "--model", name, "--alias", "production", "--port", str(port),
            "--poll-seconds", "0.5"]  # fmt: skip
    with log.open("w") as handle:
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        ready = _wait_for(lambda: _get(base + "/readyz"), 120, "service not ready", log)
        assert ready["version"] == v1
        assert _get(base + "/version")["privacy"] == {"privacy.epsilon": "1.5", "privacy.unit": "user"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(base + "/recommend", body=body)
        assert refused.value.code == 401
        answer = _get(base + "/recommend", token="t0ken", body=body)
        assert answer["model"]["version"] == v1
        assert [r["item"] for r in answer["items"]] == first.recommend(body["items"], k=6).items

        registry.set_registered_model_alias(name, "production", v2)  # promotion, as the gate does it
        _wait_for(lambda: _get(base + "/readyz")["version"] == v2, 60, "new production version not served", log)
        answer = _get(base + "/recommend", token="t0ken", body=body)
        assert answer["model"]["version"] == v2
        assert [r["item"] for r in answer["items"]] == second.recommend(body["items"], k=6).items
        assert _get(base + "/version")["privacy"]["privacy.epsilon"] == "3.0"
        assert process.poll() is None  # the same process throughout
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.integration
def test_several_workers_serve_under_gunicorn(tmp_path, recommender):
    model_dir = recommender.save(tmp_path / "model")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "FEDML_SERVE_TOKEN": "t0ken"}
    args = [sys.executable, "-m", "fedml.serving", "--model-dir", str(model_dir), "--port", str(port), "--workers", "2"]
    with log.open("w") as handle:
        process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    body = {"items": [recommender.ids.items[0], "no-such-item"], "k": 5}
    try:
        _wait_for(lambda: _get(base + "/readyz"), 120, "service not ready", log)
        for _ in range(6):  # several connections: whichever worker answers, it answers the same
            answer = _get(base + "/recommend", token="t0ken", body=body)
            assert [r["item"] for r in answer["items"]] == recommender.recommend(body["items"], k=5).items
            assert answer["unknown_items"] == ["no-such-item"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            _get(base + "/recommend", body=body)
        assert refused.value.code == 401
        assert "gunicorn" in log.read_text().lower()
    finally:
        process.terminate()
        process.wait(timeout=30)
