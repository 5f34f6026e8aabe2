"""The shopping guide over HTTP: ``POST /recommend``, health, readiness, the model's version, a page.

``create_app(source)`` builds the service around any :class:`~fedml.serving.source.ModelSource`
(the MLflow registry in production, see :mod:`fedml.serving.registry`; a directory or an
in-memory recommender in tests and benchmarks). The source is polled in the background, so a new
production version is served without a restart.

Requests that arrive together are answered together: they queue, and all that are waiting (up to
``max_batch``) are computed as one batch, which turns the fold-in's passes over the item matrix into
matrix products, on a compute thread or (``compute_threads = 0``, one server process per core) in
the event loop's thread. The batcher waits a little (``batch_wait_ms``, 2 ms) for as many requests as
its last batch held, so that the shoppers it just answered can join the next batch.
"""

# no "from __future__ import annotations": FastAPI reads the request model from a local annotation
import asyncio
import contextlib
import hmac
import logging
import math
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, create_model

from fedml.serving.recommender import Recommendation
from fedml.serving.source import LoadedModel, ModelSlot, ModelSource

logger = logging.getLogger(__name__)
STATIC = resources.files("fedml.serving") / "static"


@dataclass(frozen=True)
class ServiceSettings:
    """Limits and behaviour of the service (the CLI fills it from flags and the environment)."""

    token: str | None = None  # when set, POST /recommend needs "Authorization: Bearer <token>"
    max_items: int = 200  # history length limit
    max_k: int = 100
    max_item_id_length: int = 200
    max_body_bytes: int = 32 * 1024
    max_page: int = 200  # GET /items limit
    poll_seconds: float = 10.0  # how often the source is asked for a new version
    max_batch: int = 32
    compute_threads: int = 1  # batches computed at once, each on its own thread; 0: in the event loop's thread
    batch_wait_ms: float = 2.0  # how long a free thread waits for its batch to fill (see MicroBatcher); 0: never


def default_compute_threads(workers: int) -> int:
    """Several server processes (one per core): compute in each one's event loop thread; one: on a thread."""
    return 0 if workers > 1 else ServiceSettings().compute_threads


# ------------------------------------------------------------------------------------ schemas


class RecommendedItem(BaseModel):
    item: str = Field(description="shop item id")
    score: float = Field(description="model score (higher is better)")
    because: str | None = Field(description="the history item most like this one; null on a cold start")
    reason: str = Field(description="a short reason for people")


class ModelRef(BaseModel):
    name: str
    version: str


class RecommendResponse(BaseModel):
    items: list[RecommendedItem]
    unknown_items: list[str] = Field(description="history ids the model does not know (ignored)")
    model: ModelRef


class ItemsPage(BaseModel):
    total: int = Field(description="items matching the search")
    offset: int
    limit: int
    items: list[str]


class VersionInfo(BaseModel):
    name: str
    version: str | None
    loaded_at: str | None
    n_items: int | None
    privacy: dict[str, str] = Field(description="the version's privacy.* tags")
    tags: dict[str, str] = Field(description="all tags of the served version")
    last_check: float | None = Field(description="unix time the source was last asked for a new version")
    reload_error: str | None = Field(description="why the last reload failed (the old model kept serving)")


class ErrorDetail(BaseModel):
    detail: str = Field(description="what was wrong, in words")


class FieldProblem(BaseModel):
    field: str = Field(description="where, e.g. body.k or query.limit")
    message: str


class InvalidRequest(BaseModel):
    """The 422 answer (see ``_validation_error``); it replaces FastAPI's default schema, which it does not match."""

    detail: str = Field(description="invalid request: each bad field with what is wrong")
    errors: list[FieldProblem]


INVALID_REQUEST = {422: {"model": InvalidRequest, "description": "the request is not valid; each bad field is named"}}

#: The error answers of POST /recommend, declared in the OpenAPI schema (tests/test_serving_schemathesis.py).
RECOMMEND_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorDetail, "description": "the body cannot be parsed at all (e.g. it is not UTF-8 text)"},
    401: {"model": ErrorDetail, "description": "a bearer token is required and was not given, or is wrong"},
    413: {"model": ErrorDetail, "description": "the body is over the size limit (with or without Content-Length)"},
    **INVALID_REQUEST,
    503: {"model": ErrorDetail, "description": "no model is loaded yet"},
}


def _json_number(value: Any) -> Any:
    """Pydantic's lax int also takes ``true`` and ``"5"``, which the schema's ``integer`` does not."""
    if isinstance(value, (bool, str)):
        raise ValueError("must be a whole number, not a boolean or a string")
    return value


#: An int as JSON Schema's ``integer`` has it: 5 or 5.0, not true or "5" (found by tests/test_serving_schemathesis.py).
WholeNumber = Annotated[int, BeforeValidator(_json_number)]


def _request_model(settings: ServiceSettings) -> type[BaseModel]:
    item_id = Annotated[str, StringConstraints(min_length=1, max_length=settings.max_item_id_length)]
    return create_model(
        "RecommendRequest",
        __config__=ConfigDict(extra="forbid"),
        items=(
            list[item_id],
            Field(
                max_length=settings.max_items, description="shop item ids the shopper recently viewed, carted or bought"
            ),
        ),
        k=(WholeNumber, Field(10, ge=1, le=settings.max_k, description="how many recommendations")),
    )


# ------------------------------------------------------------------------------------ batching


class MicroBatcher:
    """Runs ``compute`` on everything queued at once, in up to ``threads`` background threads, or
    with ``threads=0`` in the event loop's own thread.

    A free thread takes the waiting requests (up to ``max_batch``) as one batch, at once if as many
    wait as it expects, else after at most ``max_wait`` seconds. It expects the requests that waited
    when its last batch ended plus as many as that batch answered: clients that wait for an answer
    before they ask again (the page, the benchmark) come back within a millisecond. Without the wait,
    batches fall into a lopsided rhythm under such load: while one batch is computed the requests of
    the previous one come back and form the next, so batches alternate between a few stragglers and
    almost everyone (50,000 items, 8 in flight: batches of 1 and 7 alternated), and a small batch
    costs nearly as much as a large one. After a wait that timed out, it expects as many as came; a
    quiet service (last batch one request, none waiting) never waits; ``max_wait = 0`` never waits.
    Free threads share the waiting requests evenly.

    ``threads=0`` computes a batch in the event loop's thread, which does nothing else meanwhile
    (requests that arrive wait in the socket buffers and form the next batch). With one server
    process per core this is the faster choice: no hand-over to a thread, and no contention for
    the interpreter lock between the loop and the computation; with one process, a compute thread
    lets the loop answer HTTP on the other core while a batch is computed.
    """

    def __init__(
        self, compute: Callable[[list[Any]], list[Any]], max_batch: int, threads: int = 1, max_wait: float = 0.0
    ) -> None:
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        self.compute = compute
        self.max_batch = max_batch
        self.inline = threads == 0
        self.threads = max(1, threads)  # batches in flight at once
        self.max_wait = max_wait
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._in_flight = 0
        self._expected = 1  # the next batch's expected size
        self._timer: asyncio.TimerHandle | None = None
        self._executor: ThreadPoolExecutor | None = None  # made on first use, and again after close()

    async def submit(self, request: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending.append((request, future))
        self._start_batches()
        return await future

    def _start_batches(self, waited: bool = False) -> None:
        loop = asyncio.get_running_loop()
        while self._pending and self._in_flight < self.threads:
            if not waited and self.max_wait > 0 and len(self._pending) < self._expected:
                if self._timer is None:  # the wait starts when a thread is free and finds too few
                    self._timer = loop.call_later(self.max_wait, self._waited)
                return
            # a share for each free thread (all for the last one); the next share must fill up again
            size = min(self.max_batch, math.ceil(len(self._pending) / (self.threads - self._in_flight)))
            batch, self._pending = self._pending[:size], self._pending[size:]
            self._in_flight += 1
            loop.create_task(self._run(batch))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _waited(self) -> None:
        self._timer = None
        self._expected = max(1, len(self._pending))  # fewer came back: expect as many as did
        self._start_batches(waited=True)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            if self.inline:
                results = self.compute([r for r, _ in batch])
            else:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="recommend")
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, self.compute, [r for r, _ in batch]
                )
        except Exception as exc:  # every request of the batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._expected = min(self.max_batch, len(batch) + len(self._pending))
            self._start_batches()

    def close(self) -> None:
        """Stop the compute threads; a later request starts new ones (the app's lifespan may run again)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


# ------------------------------------------------------------------------------------ app


def create_app(source: ModelSource, settings: ServiceSettings | None = None, preload: bool = False) -> FastAPI:
    """The service around ``source``; the first load is tried at start-up, then polled.

    ``preload``: try the first load now, in the calling process (a server that forks its workers
    after creating the app, gunicorn's ``preload_app``, then shares the model's memory among them).
    """
    settings = settings or ServiceSettings()
    slot = ModelSlot(source)
    if preload:
        slot.refresh()
    RecommendRequest = _request_model(settings)

    def compute(requests: list[tuple[list[str], int]]) -> list[tuple[LoadedModel, Recommendation]]:
        model = slot.model  # one model for the whole batch, even if a swap happens meanwhile
        if model is None:
            raise LookupError("no model loaded")
        recommendations = model.index.recommend_many([items for items, _ in requests], [k for _, k in requests])
        return [(model, rec) for rec in recommendations]

    batcher = MicroBatcher(compute, settings.max_batch, settings.compute_threads, settings.batch_wait_ms / 1e3)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, slot.refresh)  # start-up waits for the first try only
        poller = asyncio.create_task(_poll(slot, settings.poll_seconds))
        try:
            yield
        finally:
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            batcher.close()

    app = FastAPI(
        title="fedml shopping guide",
        description="Recommendations from a shopper's recent items, by a federated, differentially private model.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # Swagger UI and ReDoc load their scripts from a CDN; the schema is at /openapi.json
        redoc_url=None,
    )
    app.state.slot = slot
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    async def authorised(request: Request) -> None:  # async: no thread hop per request
        if settings.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(401, "a bearer token is required (Authorization: Bearer <token>)",
                                headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def serving_model() -> LoadedModel:
        if slot.model is None:
            raise HTTPException(503, f"no model loaded yet ({slot.last_error or 'waiting for the first version'})")
        return slot.model

    @app.post("/recommend", response_model=RecommendResponse, dependencies=[Depends(authorised)],
              responses=RECOMMEND_ERRORS)  # fmt: skip
    async def recommend(body: RecommendRequest) -> dict[str, Any]:  # type: ignore[valid-type]
        """Top-k items for a shopper given by recent items; unknown ids are reported, not fatal."""
        serving_model()
        try:
            model, rec = await batcher.submit((body.items, body.k))
        except LookupError as exc:
            raise HTTPException(503, str(exc)) from exc
        return {
            "items": [
                {"item": item, "score": score, "because": because, "reason": _reason(because)}
                for item, score, because in zip(rec.items, rec.scores, rec.because)
            ],
            "unknown_items": rec.unknown_items,
            "model": {"name": model.name, "version": model.version},
        }

    @app.get("/items", response_model=ItemsPage, responses={**INVALID_REQUEST, 503: RECOMMEND_ERRORS[503]})
    def items(
        q: Annotated[str, Query(max_length=settings.max_item_id_length, description="case-insensitive substring")] = "",
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=settings.max_page)] = 50,
    ) -> dict[str, Any]:
        """The catalogue, a page at a time, optionally only ids containing ``q``."""
        model = serving_model()
        catalogue = model.recommender.ids.items
        matches = catalogue if not q else [item for item in catalogue if q.lower() in item.lower()]
        return {"total": len(matches), "offset": offset, "limit": limit, "items": matches[offset : offset + limit]}

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: RECOMMEND_ERRORS[503]})
    def readyz() -> dict[str, str]:
        """A model is loaded (503 otherwise)."""
        model = serving_model()
        return {"status": "ready", "model": model.name, "version": model.version}

    @app.get("/version", response_model=VersionInfo)
    def version() -> dict[str, Any]:
        """The served model: name, version, its privacy guarantee and other tags."""
        model = slot.model
        tags = {} if model is None else dict(model.tags)
        return {
            "name": source.name,
            "version": None if model is None else model.version,
            "loaded_at": None if model is None else model.loaded_at,
            "n_items": None if model is None else model.index.n_items,
            "privacy": {k: v for k, v in tags.items() if k.startswith("privacy.")},
            "tags": tags,
            "last_check": slot.last_check,
            "reload_error": slot.last_error,
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def _reason(because: str | None) -> str:
    return "popular in the shop" if because is None else f"because you viewed {because}"


async def _poll(slot: ModelSlot, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(seconds)
        await loop.run_in_executor(None, slot.refresh)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field in words, e.g. ``body.k: Input should be less than or equal to 100``."""
    problems = [
        {"field": ".".join(str(part) for part in error.get("loc", ())), "message": error.get("msg", "invalid")}
        for error in exc.errors()
    ]
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse({"detail": f"invalid request: {summary}", "errors": problems}, status_code=422)


class BodySizeLimit:
    """Refuses request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        seen = 0

        async def limited_receive() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # FastAPI turns this into the 413 response
                    raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    async def _refuse(self, send: Callable) -> None:
        response = JSONResponse({"detail": f"request body over {self.max_bytes} bytes"}, status_code=413)
        await response({"type": "http"}, None, send)  # type: ignore[arg-type]
