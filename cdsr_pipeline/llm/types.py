"""The values passed between stages and backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class BackendUnavailableError(RuntimeError):
    """The LLM could not be reached (connection refused, timeouts, 5xx) after all retries.

    Not an answer: nothing is recorded for the call, and a rerun asks it again.
    """


@dataclass(frozen=True)
class Prompt:
    """A completion prompt: ``prefix`` is shared by many calls, ``body`` is per item."""

    prefix: str
    body: str

    @property
    def text(self) -> str:
        return self.prefix + self.body


@dataclass(frozen=True)
class CompletionRequest:
    prompt: Prompt
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int = 0
    # Penalty on tokens seen in the last 64 (1.0: none; Ollama's own default is 1.1).
    repeat_penalty: float = 1.0
    # A JSON schema the answer must follow: Ollama's ``format=``, a llama.cpp
    # grammar for the embedded backend.
    json_schema: Mapping[str, Any] | None = None
    # A GBNF grammar for a non-JSON answer. Only llama.cpp enforces it (Ollama's API
    # takes JSON schemas only): for Ollama the prompt and strict parsing must do.
    grammar: str | None = None

    def with_seed(self, seed: int) -> CompletionRequest:
        return dataclasses.replace(self, seed=seed)

    def params(self) -> dict[str, Any]:
        """The decoding parameters, as recorded in the call log."""
        return {
            "max_tokens": self.max_tokens,
            "stop": list(self.stop),
            "temperature": self.temperature,
            "seed": self.seed,
            "repeat_penalty": self.repeat_penalty,
            "json_schema": self.json_schema,
            "grammar": self.grammar,
        }


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    latency_s: float
    transport_attempts: int = 1  # HTTP attempts (Ollama retries); 1 for embedded
    server: str | None = None  # the Ollama server that answered; None for embedded


@dataclass(frozen=True)
class ContinuationRequest:
    """Score each of ``continuations`` as the text that follows ``prompt``."""

    prompt: Prompt
    continuations: tuple[str, ...]

    def params(self) -> dict[str, Any]:
        """What is scored besides the prompt, as recorded in the call log."""
        return {"continuations": list(self.continuations)}
