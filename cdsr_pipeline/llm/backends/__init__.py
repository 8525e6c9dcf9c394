"""One LLM interface, two backends: an Ollama server and llama.cpp in-process.

The stages speak to an :class:`LLMBackend` only. A prompt is split into a ``prefix``
shared by many calls (instructions, few-shot examples) and a per-item ``body``: the
embedded backend keeps the prefix's KV cache and evaluates only the body; Ollama
receives ``prefix + body`` as one prompt.

Every backend has an ``identity`` (backend, model and, for GGUF files, the file's
sha256): it is part of every call-log key, so another model never serves a cached
answer, and it goes into asset metadata.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from cdsr_pipeline.llm.backends.embedded import EmbeddedBackend, EmbeddedConfig
from cdsr_pipeline.llm.backends.ollama import OllamaBackend, OllamaConfig
from cdsr_pipeline.llm.types import (
    BackendUnavailableError,
    Completion,
    CompletionRequest,
    ContinuationRequest,
    Prompt,
)

__all__ = [
    "BackendUnavailableError",
    "Completion",
    "CompletionRequest",
    "ContinuationRequest",
    "EmbeddedBackend",
    "EmbeddedConfig",
    "LLMBackend",
    "LLMConfig",
    "OllamaBackend",
    "OllamaConfig",
    "Prompt",
    "SupportsContinuationScoring",
    "open_backend",
]


@runtime_checkable
class LLMBackend(Protocol):
    """What every stage needs from an LLM."""

    kind: str  # "ollama" | "embedded"
    identity: Mapping[str, str]

    def complete(self, requests: Sequence[CompletionRequest]) -> Iterator[tuple[int, Completion]]:
        """Answer every request; yields ``(index into requests, completion)`` as answers finish.

        Transport failures that survive the backend's own retries raise
        :class:`BackendUnavailableError` from the iterator; what was yielded before
        stays valid.
        """
        ...

    def close(self) -> None: ...


@runtime_checkable
class SupportsContinuationScoring(Protocol):
    """Backends that can score given continuations by log-probability (embedded only)."""

    def continuation_logprobs(self, requests: Sequence[ContinuationRequest]) -> Iterator[tuple[int, list[float]]]:
        """log P(continuation | prompt) for every continuation of every request, as they finish."""
        ...


@dataclass
class LLMConfig:
    """Which backend the stages use, and its settings."""

    backend: Literal["embedded", "ollama"] = "embedded"
    embedded: EmbeddedConfig = field(default_factory=EmbeddedConfig)
    ollama: OllamaConfig = field(default_factory=OllamaConfig)


def open_backend(config: LLMConfig) -> LLMBackend:
    """The configured backend, ready to answer (model loaded / server and model checked)."""
    if config.backend == "embedded":
        return EmbeddedBackend(config.embedded)
    if config.backend == "ollama":
        return OllamaBackend(config.ollama)
    raise ValueError(f"unknown LLM backend {config.backend!r}; use 'embedded' or 'ollama'")
