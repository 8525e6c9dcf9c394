"""Dagster resources: where data comes from and where artifacts go (plus models, later).

Resources describe the environment a run works in; hyperparameters are ``dg.Config``
on the assets. Both are fingerprinted, so changing either reruns what depends on it.
"""

from __future__ import annotations

from typing import Optional

import dagster as dg
from pydantic import Field

from .data.sources import FORMATS, SourceSpec, demo_source
from .storage import ArtifactStore


class StorageResource(dg.ConfigurableResource):
    """Artifact root. Empty: ``$CDSR_STORAGE`` or the project's ``storage/`` folder."""

    root: str = Field(default="", description="Folder holding artifacts/ and cache/; empty for the default.")

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root or None)


class DatasetSource(dg.ConfigurableResource):
    """The raw data the pipeline starts from. Default: the bundled demo sample."""

    format: str = Field(default="llmcdsr", description=f"One of: {', '.join(FORMATS)}.")
    path: str = Field(default="", description="Folder (Amazon dumps, releases) or file (interactions); empty: demo sample.")
    domains: Optional[list[str]] = Field(
        default=None,
        description="Two domain names, A first: Amazon category names, the interactions file's domain values, "
        "or display names for releases (default: from the folder name).",
    )
    items_path: Optional[str] = Field(default=None, description="Items file for the interactions format (optional).")

    def spec(self) -> SourceSpec:
        if not self.path:
            return demo_source(tuple(self.domains) if self.domains else None)
        return SourceSpec(
            format=self.format,
            path=self.path,
            domains=tuple(self.domains) if self.domains else None,
            items_path=self.items_path,
        )


class _EncoderResource(dg.ConfigurableResource):
    """A frozen encoder (see ``features/encoders.py``); built only when a stage has work to do."""

    backend: str
    model: Optional[str] = Field(default=None, description="open_clip architecture, or a local sentence-transformers folder.")
    pretrained: Optional[str] = Field(
        default=None, description="open_clip: pretrained tag (downloaded once, cached) or a local checkpoint file."
    )
    device: Optional[str] = Field(default=None, description="cuda / cpu; empty: CUDA when present.")
    batch_size: Optional[int] = Field(default=None, description="Items per forward pass; empty: 64.")
    precision: str = Field(
        default="fp32",
        description="fp32, or bf16 where the device multiplies bf16 natively (other vectors: the tag candidates, "
        "hence the LLM's prompts, change with them).",
    )

    def spec(self):
        from .features.encoders import EncoderSpec

        return EncoderSpec(
            backend=self.backend,
            model=self.model,
            pretrained=self.pretrained,
            device=self.device,
            batch_size=self.batch_size,
            precision=self.precision,
        )

    def fingerprint(self, store: ArtifactStore) -> str:
        """What determines the vectors: backend, model and weights (by content hash where local).

        Device and batch size do not change the output and are left out.
        """
        from pathlib import Path

        from .features.encoders import folder_sha256
        from .storage import stable_hash

        spec = self.spec().resolved()
        identity = {"backend": spec.backend, "model": spec.model, "pretrained": spec.pretrained}
        if spec.precision != "fp32":
            identity["precision"] = spec.precision  # fp32 keeps the fingerprint it had before precision existed
        for key in ("model", "pretrained"):
            value = identity[key]
            if value and Path(value).expanduser().is_file():
                identity[key] = "sha256:" + store.file_hashes.file_hash(Path(value).expanduser())
            elif value and Path(value).expanduser().is_dir():
                identity[key] = "sha256:" + folder_sha256(Path(value).expanduser())
        return stable_hash(identity)


class TextEncoderResource(_EncoderResource):
    """Text encoder for E_tex and E_llm. Default: the bundled MiniLM (offline); CLIP: backend open_clip."""

    backend: str = Field(default="sentence_transformers", description="sentence_transformers or open_clip.")


class ImageEncoderResource(_EncoderResource):
    """Image encoder for E_img: open_clip ViT-B-32 (LAION-2B) by default; loaded only if items have images."""

    backend: str = Field(default="open_clip", description="open_clip (the only backend with images).")


class LLMResource(dg.ConfigurableResource):
    """The LLM of the augmentation and tag stages: embedded llama.cpp (default) or an Ollama server."""

    backend: str = Field(default="embedded", description="embedded (llama.cpp in-process) or ollama.")
    model: str = Field(
        default="",
        description="embedded: smollm2 | gemma3-270m | a .gguf path (default smollm2); "
        "ollama: a model tag (default deepseek-r1:14b).",
    )
    n_threads: int = Field(default=2, description="embedded: CPU threads.")
    generation_batch: int = Field(default=16, description="embedded: sequences generated together.")
    precision: str = Field(default="f16", description="embedded: f16 (converted once; faster on CPU) or as_shipped.")
    host: Optional[str] = Field(default=None, description="ollama: server URL, or several comma-separated (requests are spread over them); empty: $OLLAMA_HOST or 127.0.0.1:11434.")
    timeout_s: float = Field(default=300.0, description="ollama: longest silence while waiting for an answer.")
    max_retries: int = Field(default=4, description="ollama: retries on connection errors, timeouts and 5xx.")
    max_concurrency: int = Field(default=4, description="ollama: requests in flight per server (match OLLAMA_NUM_PARALLEL).")
    think: Optional[bool] = Field(default=None, description="ollama: false turns a reasoning model's thinking off.")

    def llm_config(self, store: ArtifactStore):
        from .llm import EmbeddedConfig, LLMConfig, OllamaConfig

        if self.backend == "embedded":
            embedded = EmbeddedConfig(
                model=self.model or EmbeddedConfig.model,
                n_threads=self.n_threads,
                generation_batch=self.generation_batch,
                precision=self.precision,
                model_dir=str(store.cache_dir("models")),
            )
            return LLMConfig(backend="embedded", embedded=embedded)
        if self.backend == "ollama":
            ollama = OllamaConfig(
                model=self.model or OllamaConfig.model,
                host=self.host,
                timeout_s=self.timeout_s,
                max_retries=self.max_retries,
                max_concurrency=self.max_concurrency,
                think=self.think,
            )
            return LLMConfig(backend="ollama", ollama=ollama)
        raise ValueError(f"unknown LLM backend {self.backend!r}; use 'embedded' or 'ollama'")

    def fingerprint(self, store: ArtifactStore) -> str:
        """Backend and model (the GGUF file's hash and precision for embedded; host and tag for Ollama).

        Threads, batch sizes and concurrency do not change answers kept in the call log.
        """
        from .llm.backends.embedded import resolve_model
        from .storage import stable_hash

        config = self.llm_config(store)
        if config.backend == "embedded":
            resolved = resolve_model(config.embedded.model, config.embedded.model_dir)
            return stable_hash(
                {"backend": "embedded", "gguf_sha256": resolved.sha256, "precision": config.embedded.precision}
            )
        hosts = config.ollama.resolved_hosts()
        host = hosts[0] if len(hosts) == 1 else sorted(hosts)  # one server: the fingerprint of earlier versions
        return stable_hash({"backend": "ollama", "host": host, "model": config.ollama.model})
