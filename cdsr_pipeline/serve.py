"""``cdsr serve``: a trained run behind an HTTP JSON API (Starlette on uvicorn).

- ``POST /recommend`` ``{"history": [...], "domain": "A", "k": 10, "exclude_seen": false}``:
  the answer of :func:`~cdsr_pipeline.model.recommend.recommend` as JSON.
- ``GET /items/{id}``: an item by global id or source id (ASIN).
- ``GET /health``: the run's name, config digest and the data versions it was trained on.

The model is loaded once per process (``weights_only=True``). Concurrent requests are
batched: a request waits at most ``max_wait_ms`` for others, and up to ``max_batch`` are
scored in one forward pass (both target domains), off the event loop. A bad request gets a
4xx with ``{"error": "..."}`` naming the problem; nothing a client sends names a file.

``workers > 1`` runs that many server processes on one listening socket (uvicorn's
supervisor, which restarts a worker that dies), each with its own copy of the model and
``cores // workers`` torch threads: a process's HTTP and JSON work holds its interpreter's
lock while its forward pass runs, so on 2 cores two single-threaded workers answer about
1.5x the requests of one two-threaded process (``benchmarks/serve.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from .model.recommend import LoadedRun, Query, RecommendError, answer_queries, load_run, make_query
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


RUN_ENV = "CDSR_SERVE_RUN"
THREADS_ENV = "CDSR_SERVE_THREADS"
"""How the parent of ``workers > 1`` tells each worker process its run folder and torch threads."""


def app_from_environment() -> Starlette:
    """The app of the run folder named by ``$CDSR_SERVE_RUN``: what each worker process
    builds (uvicorn's workers import their app by name: it cannot be handed over as an object)."""
    import torch

    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    return create_app(load_run(os.environ[RUN_ENV]))


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` for worker processes to share.

    Made with protocol ``IPPROTO_TCP`` (the one uvicorn binds for ``--workers`` has
    protocol 0): asyncio turns Nagle's algorithm off (``TCP_NODELAY``) only on connections
    accepted from a socket that says it is TCP. With Nagle on, the body of a response,
    written after its headers, waits for the client's delayed acknowledgement: about
    40 ms added to every request on loopback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise RecommendError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def serve(run: LoadedRun | Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1) -> None:
    """Serve a run until interrupted: in this process, or in ``workers`` processes (each
    loads the run's folder itself)."""
    import uvicorn

    if workers < 1:
        raise RecommendError(f"workers must be at least 1, not {workers}")
    if workers == 1:
        uvicorn.run(create_app(run if isinstance(run, LoadedRun) else load_run(run)), host=host, port=port, log_level="info")
        return
    from uvicorn.supervisors import Multiprocess

    folder = run.folder if isinstance(run, LoadedRun) else Path(run)
    os.environ[RUN_ENV] = str(folder.resolve())
    os.environ[THREADS_ENV] = str(max(1, (os.cpu_count() or 1) // workers))
    config = uvicorn.Config(
        f"{__name__}:app_from_environment", factory=True, host=host, port=port, workers=workers, log_level="info"
    )
    Multiprocess(config, sockets=[listening_socket(host, port)]).run()
