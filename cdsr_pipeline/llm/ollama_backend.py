"""The Ollama backend: the official ``ollama`` client against an Ollama server.

Requests go to ``/api/generate`` with ``prefix + body`` as the prompt (the server
applies the model's chat template unless ``raw``), streamed so that ``timeout_s``
bounds the silence between two pieces of an answer rather than a whole long answer
from a slow model. Connection errors, timeouts and 5xx answers are retried with
exponential backoff; at most ``max_concurrency`` requests are in flight.
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

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
_MAX_BACKOFF_S = 60.0
# DeepSeek-R1 served without ``think`` inlines its reasoning before the answer.
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>\s*", re.DOTALL)


@dataclass
class OllamaConfig:
    """Where the server is and how to talk to it."""

    model: str = "deepseek-r1:14b"  # the papers' model family; see the README for alternatives
    host: str | None = None  # None: $OLLAMA_HOST, else http://127.0.0.1:11434
    timeout_s: float = 300.0  # longest silence while waiting for (the next part of) an answer
    max_retries: int = 4  # retries after the first attempt, on connection errors, timeouts and 5xx
    backoff_s: float = 1.0  # delay before the first retry; doubles at each retry (at most 60 s)
    max_concurrency: int = 4  # requests in flight at once (match OLLAMA_NUM_PARALLEL)
    think: bool | None = None  # None: the server's default; False turns a reasoning model's thinking off
    num_ctx: int | None = None  # context window; None: the server's default
    keep_alive: str | None = None  # how long the server keeps the model loaded, e.g. "30m"
    raw: bool = False  # send the prompt without the model's template (base models)

    def resolved_host(self) -> str:
        return self.host or os.environ.get("OLLAMA_HOST") or DEFAULT_HOST


class _RetryableError(Exception):
    pass


class OllamaBackend:
    kind = "ollama"

    def __init__(self, config: OllamaConfig | None = None):
        self.config = config or OllamaConfig()
        self.host = self.config.resolved_host()
        self._local = threading.local()
        digest, _ = self._with_retries(self._model_digest, what=f"list the models of {self.host}")
        self.identity = {"backend": self.kind, "model": self.config.model, "digest": digest}

    def close(self) -> None:
        """Clients are per thread and closed by garbage collection; nothing to release."""

    # -- HTTP -------------------------------------------------------------------
    def _client(self) -> ollama.Client:
        # httpx clients are not meant to be shared between threads: one per worker.
        client = getattr(self._local, "client", None)
        if client is None:
            client = ollama.Client(host=self.host, timeout=self.config.timeout_s)
            self._local.client = client
        return client

    def _model_digest(self) -> str:
        wanted = _with_tag(self.config.model)
        try:
            models = self._client().list().models
        except ollama.ResponseError as error:
            raise _classify(error) from error
        except (ConnectionError, httpx.TransportError, ValueError) as error:
            raise _RetryableError(str(error)) from error
        for model in models:
            if _with_tag(model.model or "") == wanted:
                return model.digest or ""
        names = ", ".join(sorted(m.model or "" for m in models)) or "none"
        raise ValueError(
            f"model {self.config.model!r} is not on the Ollama server {self.host} (it has: {names}); "
            f"run `ollama pull {self.config.model}` there"
        )

    def _with_retries(self, call, *, what: str):
        delay = self.config.backoff_s
        last_error = ""
        for attempt in range(1, self.config.max_retries + 2):
            try:
                return call(), attempt
            except _RetryableError as error:
                last_error = str(error)
                if attempt > self.config.max_retries:
                    break
                log.warning("ollama: %s failed (%s); retry %d in %.1fs", what, error, attempt, delay)
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF_S)
        raise BackendUnavailableError(
            f"Ollama server {self.host} unavailable: could not {what} after "
            f"{self.config.max_retries + 1} attempts (last error: {last_error})"
        )

    def _generate_once(self, request: CompletionRequest) -> tuple[str, str]:
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
            for chunk in self._client().generate(
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
        (text, finish), attempts = self._with_retries(lambda: self._generate_once(request), what="generate")
        return Completion(text, finish, time.perf_counter() - started, attempts)

    # -- the interface ----------------------------------------------------------
    def complete(self, requests: Sequence[CompletionRequest]) -> Iterator[tuple[int, Completion]]:
        """Requests run ``max_concurrency`` at a time; answers are yielded as they finish.

        When the server stays unavailable, requests not yet started are cancelled,
        the answers of those already running are still yielded, then the error is raised.
        """
        pending = iter(enumerate(requests))
        failure: BackendUnavailableError | None = None
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="ollama") as pool:
            running: dict[Future[Completion], int] = {}

            def fill() -> None:
                while failure is None and len(running) < self.config.max_concurrency:
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
