"""``cdsr serve``: a trained run behind an HTTP JSON API (Starlette on uvicorn).

- ``POST /recommend`` ``{"history": [...], "domain": "A", "k": 10, "exclude_seen": false}``:
  the answer of :func:`~cdsr_pipeline.model.recommend.recommend` as JSON.
- ``GET /items/{id}``: an item by global id or source id (ASIN).
- ``GET /health``: the run's name, config digest and the data versions it was trained on.

The model is loaded once (``weights_only=True``). Concurrent requests are batched: a
request waits at most ``max_wait_ms`` for others, and up to ``max_batch`` are scored in
one forward pass per target domain, off the event loop. A bad request gets a 4xx with
``{"error": "..."}`` naming the problem; nothing a client sends names a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .model.recommend import LoadedRun, Query, RecommendError, answer_queries, make_query
from .storage import MANIFEST_NAME

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20


@dataclass
class Batcher:
    """Collects concurrent queries and answers them together."""

    run: LoadedRun
    max_batch: int = 64
    max_wait_ms: float = 2.0
    _queue: asyncio.Queue | None = field(default=None, init=False)
    _worker: asyncio.Task | None = field(default=None, init=False)
    batches: int = field(default=0, init=False)  # forward rounds run (for tests and logs)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def answer(self, query: Query):
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((query, future))
        return await future

    async def _loop(self) -> None:
        while True:
            pending = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.max_wait_ms / 1000
            while len(pending) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    pending.append(await asyncio.wait_for(self._queue.get(), timeout) if timeout > 0 else self._queue.get_nowait())
                except (asyncio.TimeoutError, asyncio.QueueEmpty):
                    break
            queries = [query for query, _ in pending]
            try:
                answers = await asyncio.to_thread(answer_queries, self.run, queries)
            except Exception as error:  # a failed batch fails its requests, not the server
                log.exception("scoring a batch of %d failed", len(queries))
                for _, future in pending:
                    future.set_exception(error)
                continue
            self.batches += 1
            for (_, future), result in zip(pending, answers, strict=True):
                future.set_result(result)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def health_info(run: LoadedRun) -> dict:
    config = json.loads((run.folder / "config.json").read_text())
    manifest_file = run.folder.parent.parent / MANIFEST_NAME  # <asset>/runs/<run>/
    data_versions = json.loads(manifest_file.read_text()).get("inputs", {}) if manifest_file.is_file() else {}
    return {"status": "ok", "run": run.name, "config_digest": config.get("identity"), "data_versions": data_versions}


def create_app(run: LoadedRun, *, max_batch: int = 64, max_wait_ms: float = 2.0) -> Starlette:
    batcher = Batcher(run, max_batch=max_batch, max_wait_ms=max_wait_ms)
    health = health_info(run)

    async def recommend_endpoint(request: Request) -> JSONResponse:
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _error(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            return _error(400, f"malformed JSON: {error}")
        if not isinstance(payload, dict):
            return _error(400, "the body must be a JSON object with history, domain, k, exclude_seen")
        unknown = sorted(set(payload) - {"history", "domain", "k", "exclude_seen"})
        if unknown:
            return _error(400, f"unknown fields: {', '.join(unknown)}")
        history, domain = payload.get("history"), payload.get("domain")
        if not isinstance(history, list) or not all(isinstance(h, (int, str)) and not isinstance(h, bool) for h in history):
            return _error(422, "history must be a list of item ids (integers or source-id strings)")
        if not isinstance(domain, (str, int)) or isinstance(domain, bool):
            return _error(422, "domain must be A, B or a domain name")
        exclude_seen = payload.get("exclude_seen", False)
        if not isinstance(exclude_seen, bool):
            return _error(422, "exclude_seen must be true or false")
        try:
            query = make_query(run, history, domain, payload.get("k", 10), exclude_seen=exclude_seen)
        except RecommendError as error:
            return _error(422, str(error))
        results = await batcher.answer(query)
        return JSONResponse({"run": run.name, "recommendations": [r.to_dict() for r in results]})

    async def item_endpoint(request: Request) -> JSONResponse:
        try:
            (item,) = run.item_ids([request.path_params["item"]])
        except RecommendError as error:
            return _error(404, str(error))
        domain = 0 if item < run.domains.sizes[0] else 1
        return JSONResponse(
            {
                "item_id": item,
                "source_id": run.source_ids[item],
                "title": run.titles[item],
                "domain": "AB"[domain],
                "domain_name": run.domains.names[domain],
            }
        )

    async def health_endpoint(request: Request) -> JSONResponse:
        return JSONResponse(health)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = Starlette(
        routes=[
            Route("/recommend", recommend_endpoint, methods=["POST"]),
            Route("/items/{item}", item_endpoint, methods=["GET"]),
            Route("/health", health_endpoint, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.batcher = batcher
    return app


def serve(run: LoadedRun, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    uvicorn.run(create_app(run), host=host, port=port, log_level="info")
