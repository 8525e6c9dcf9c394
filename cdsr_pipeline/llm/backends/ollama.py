"""The Ollama backend: the official ``ollama`` client against an Ollama server.

Requests go to ``/api/generate`` with ``prefix + body`` as the prompt (the server
applies the model's chat template unless ``raw``), streamed so that ``timeout_s``
bounds the silence between two pieces of an answer rather than a whole long answer
from a slow model. Connection errors, timeouts and 5xx answers are retried with
exponential backoff; at most ``max_concurrency`` requests are in flight per server.

Several servers (``host`` as a comma-separated list, or ``$OLLAMA_HOST`` likewise)
share the requests: each goes to the server with the fewest requests in flight; a
server that fails a request is set aside for ``down_s`` seconds and the request is
retried on another one at once (with backoff only when every server is down). All
servers must serve the same model weights (the same digest): the answers are keyed by
it. Each answer records the server that gave it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import httpx
import ollama

from cdsr_pipeline.llm.types import BackendUnavailableError, Completion, CompletionRequest
from cdsr_pipeline.settings import setting

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
_MAX_BACKOFF_S = 60.0
# DeepSeek-R1 served without ``think`` inlines its reasoning before the answer.
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


@dataclass
class OllamaConfig:
    """Where the server is and how to talk to it."""

    model: str = "deepseek-r1:14b"  # the papers' model family; see the README for alternatives
    host: str | None = setting(
        None,
        "Server URL, or several comma-separated (requests are spread over them); empty: $OLLAMA_HOST or 127.0.0.1:11434.",
    )
    timeout_s: float = setting(300.0, "Longest silence while waiting for (the next part of) an answer.")
    max_retries: int = setting(4, "Retries after the first attempt, on connection errors, timeouts and 5xx.")
    backoff_s: float = 1.0  # delay before the first retry; doubles at each retry (at most 60 s)
    max_concurrency: int = setting(4, "Requests in flight at once per server (match OLLAMA_NUM_PARALLEL).")
    down_s: float = 30.0  # a server that failed a request gets no other for this long (while another is up)
    think: bool | None = setting(None, "Empty: the server's default; false turns a reasoning model's thinking off.")
    num_ctx: int | None = None  # context window; None: the server's default
    keep_alive: str | None = None  # how long the server keeps the model loaded, e.g. "30m"
    raw: bool = False  # send the prompt without the model's template (base models)

    def resolved_hosts(self) -> list[str]:
        """The servers' URLs, in the order given."""
        text = self.host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST
        hosts = [part.strip() for part in text.split(",") if part.strip()]
        if not hosts:
            raise ValueError(f"no Ollama server in host {text!r}")
        return list(dict.fromkeys(hosts))


class _RetryableError(Exception):
    pass


@dataclass
class _Server:
    """One Ollama server and what this backend knows of it."""

    url: str
    in_flight: int = 0
    down_until: float = 0.0  # time.monotonic() before which it gets no request (while another is up)
    answered: int = 0
    failed: int = 0


class OllamaBackend:
    kind = "ollama"

    def __init__(self, config: OllamaConfig | None = None):
        self.config = config or OllamaConfig()
        self.servers = [_Server(url) for url in self.config.resolved_hosts()]
        self.host = ", ".join(server.url for server in self.servers)
        self._local = threading.local()
        self._lock = threading.Lock()
        digests: dict[str, str] = {}
        unavailable: list[BackendUnavailableError] = []
        for server in self.servers:
            try:
                digests[server.url], _ = self._with_retries(
                    lambda: self._model_digest(server), what=f"list the models of {server.url}", server=server
                )
            except BackendUnavailableError as error:
                if len(self.servers) == 1:
                    raise
                unavailable.append(error)
                server.down_until = time.monotonic() + self.config.down_s
                log.warning("ollama: %s; it gets requests again once it answers", error)
        if not digests:
            raise BackendUnavailableError("no Ollama server is available: " + "; ".join(str(e) for e in unavailable))
        if len(set(digests.values())) > 1:
            shown = ", ".join(f"{url} has digest {digest[:12] or '?'}" for url, digest in digests.items())
            raise ValueError(
                f"the Ollama servers serve different weights for {self.config.model!r} ({shown}): their answers "
                f"would differ; pull the same model on every server"
            )
        self._digest = next(iter(digests.values()))
        self._verified = set(digests)  # servers whose model digest was checked
        self.identity = {"backend": self.kind, "model": self.config.model, "digest": self._digest}

    def close(self) -> None:
        """Clients are per thread and closed by garbage collection; nothing to release."""

    # -- HTTP -------------------------------------------------------------------
    def _client(self, server: _Server) -> ollama.Client:
        # httpx clients are not meant to be shared between threads: one per worker and server.
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if server.url not in clients:
            clients[server.url] = ollama.Client(host=server.url, timeout=self.config.timeout_s)
        return clients[server.url]

    def _model_digest(self, server: _Server) -> str:
        wanted = _with_tag(self.config.model)
        try:
            models = self._client(server).list().models
        except ollama.ResponseError as error:
            raise _classify(error) from error
        except (ConnectionError, httpx.TransportError, ValueError) as error:
            raise _RetryableError(str(error)) from error
        for model in models:
            if _with_tag(model.model or "") == wanted:
                return model.digest or ""
        names = ", ".join(sorted(m.model or "" for m in models)) or "none"
        raise ValueError(
            f"model {self.config.model!r} is not on the Ollama server {server.url} (it has: {names}); "
            f"run `ollama pull {self.config.model}` there"
        )

    def _pick(self, avoid: _Server | None) -> _Server:
        """The server for the next attempt: the fewest requests in flight among those up
        (not ``avoid``, the one that just failed, while another is up); when all are
        down, the one that comes back first."""
        now = time.monotonic()
        with self._lock:
            up = [s for s in self.servers if s.down_until <= now and s is not avoid]
            if not up:
                up = [min(self.servers, key=lambda s: (s.down_until, s is avoid))]
            server = min(up, key=lambda s: s.in_flight)
            server.in_flight += 1
            return server

    def _release(self, server: _Server, failed: bool) -> None:
        with self._lock:
            server.in_flight -= 1
            if failed:
                server.failed += 1
                server.down_until = time.monotonic() + self.config.down_s
            else:
                server.answered += 1
                server.down_until = 0.0

    def _with_retries(self, call, *, what: str, server: _Server | None = None):
        """``call(server)`` until it succeeds; on a retryable error the next attempt goes to
        another server at once if one is up, else after an exponential backoff. With
        ``server``, every attempt goes to that one (``call`` then takes no argument)."""
        delay = self.config.backoff_s
        last_error = ""
        failed: _Server | None = None
        for attempt in range(1, self.config.max_retries + 2):
            target = server or self._pick(avoid=failed)
            try:
                result = call() if server is not None else call(target)
            except _RetryableError as error:
                last_error = f"{target.url}: {error}"
                if server is None:
                    self._release(target, failed=True)
                failed = target
                if attempt > self.config.max_retries:
                    break
                elsewhere = server is None and any(s.down_until <= time.monotonic() for s in self.servers)
                if elsewhere:
                    log.warning("ollama: %s failed on %s (%s); set aside for %.0fs, retry %d on another server",
                                what, target.url, error, self.config.down_s, attempt)
                    continue
                log.warning("ollama: %s failed on %s (%s); retry %d in %.1fs", what, target.url, error, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
            except BaseException:
                if server is None:
                    self._release(target, failed=False)
                raise
            else:
                if server is None:
                    self._release(target, failed=False)
                return (result, target) if server is None else result, attempt
        raise BackendUnavailableError(
            f"Ollama server{'s' if len(self.servers) > 1 else ''} {self.host} unavailable: could not {what} after "
            f"{self.config.max_retries + 1} attempts (last error: {last_error})"
        )

    def _generate_once(self, request: CompletionRequest, server: _Server) -> tuple[str, str]:
        if server.url not in self._verified:  # down at start: its weights are checked before its first answer
            digest = self._model_digest(server)
            if digest != self._digest:
                raise ValueError(f"the Ollama server {server.url} serves other weights for {self.config.model!r} "
                                 f"(digest {digest[:12]}, not {self._digest[:12]}); pull the same model there")
            self._verified.add(server.url)
        options = {
            "temperature": request.temperature,
            "seed": request.seed,
            "num_predict": request.max_tokens,
            "repeat_penalty": request.repeat_penalty,
        }
        if request.stop:
            options["stop"] = list(request.stop)
        if self.config.num_ctx:
            options["num_ctx"] = self.config.num_ctx
        parts: list[str] = []
        done_reason = None
        try:
            for chunk in self._client(server).generate(
                model=self.config.model,
                prompt=request.prompt.text,
                stream=True,
                raw=self.config.raw or None,
                format=dict(request.json_schema) if request.json_schema else None,
                options=options,
                think=self.config.think,
                keep_alive=self.config.keep_alive,
            ):
                if chunk.model and _with_tag(chunk.model) != _with_tag(self.config.model):
                    # the server swapped models under the run: its answers are not this model's
                    raise _RetryableError(f"answered by model {chunk.model!r}, not {self.config.model!r}")
                parts.append(chunk.response or "")
                if chunk.done:
                    done_reason = "length" if chunk.done_reason == "length" else "stop"
        except ollama.ResponseError as error:
            raise _classify(error) from error
        except (ConnectionError, httpx.TransportError, ValueError) as error:
            # ValueError: a broken NDJSON line, i.e. a broken connection or server.
            raise _RetryableError(f"{type(error).__name__}: {error}") from error
        if done_reason is None:  # the connection closed before the final chunk: a cut answer
            raise _RetryableError(f"the stream ended after {len(parts)} chunks without its final one")
        return _THINK_BLOCK.sub("", "".join(parts), count=1), done_reason

    def _generate(self, request: CompletionRequest) -> Completion:
        started = time.perf_counter()
        ((text, finish), server), attempts = self._with_retries(
            lambda server: self._generate_once(request, server), what="generate"
        )
        return Completion(text, finish, time.perf_counter() - started, attempts, server.url)

    # -- the interface ----------------------------------------------------------
    def complete(self, requests: Sequence[CompletionRequest]) -> Iterator[tuple[int, Completion]]:
        """Requests run ``max_concurrency`` at a time per server; answers are yielded as they finish.

        When the server stays unavailable, requests not yet started are cancelled,
        the answers of those already running are still yielded, then the error is raised.
        """
        pending = iter(enumerate(requests))
        failure: BackendUnavailableError | None = None
        workers = self.config.max_concurrency * len(self.servers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ollama") as pool:
            running: dict[Future[Completion], int] = {}

            def fill() -> None:
                while failure is None and len(running) < workers:
                    item = next(pending, None)
                    if item is None:
                        return
                    running[pool.submit(self._generate, item[1])] = item[0]

            fill()
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    index = running.pop(future)
                    try:
                        completion = future.result()
                    except BackendUnavailableError as error:
                        failure = failure or error
                        continue
                    yield index, completion
                fill()
        if failure is not None:
            raise failure


def _with_tag(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def _classify(error: ollama.ResponseError) -> Exception:
    """5xx and mid-stream errors are worth retrying; 4xx means the request itself is wrong."""
    if error.status_code >= 500 or error.status_code == -1 or error.status_code == 429:
        return _RetryableError(f"HTTP {error.status_code}: {error.error}")
    return RuntimeError(f"Ollama rejected the request (HTTP {error.status_code}): {error.error}")
