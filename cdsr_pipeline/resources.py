"""Dagster resources: where data comes from, where artifacts go, and the encoders and LLM.

Resources describe the environment a run works in; hyperparameters are ``dg.Config``
on the assets. Both are fingerprinted, so changing either reruns what depends on it.
The encoder and LLM resources take their fields (types, defaults, descriptions) from the
library's dataclasses (``EncoderSpec``, ``EmbeddedConfig``, ``OllamaConfig``), like the
assets' configs (``assets/_config.py``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import dagster as dg
from pydantic import Field

from .assets._config import dagster_config, dagster_fields
from .data.sources import FORMATS, SourceSpec, demo_source
from .features.encoders import EncoderSpec, folder_sha256
from .llm.backends import EmbeddedConfig, LLMConfig, OllamaConfig
from .llm.backends.embedded import resolve_model
from .storage import ArtifactStore, stable_hash


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


class _EncoderResourceBase(dg.ConfigurableResource):
    """A frozen encoder (see ``features/encoders.py``); built only when a stage has work to
    do. Its fields are :class:`~cdsr_pipeline.features.encoders.EncoderSpec`'s."""

    def spec(self) -> EncoderSpec:
        return EncoderSpec(**{field.name: getattr(self, field.name) for field in dataclasses.fields(EncoderSpec)})

    def fingerprint(self, store: ArtifactStore) -> str:
        """What determines the vectors: backend, model and weights (by content hash where local).

        Device and batch size do not change the output and are left out.
        """
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


def _encoder_resource(name: str, doc: str, backend: str, backend_doc: str) -> type[_EncoderResourceBase]:
    fields = dagster_fields(EncoderSpec)
    fields["backend"] = (str, Field(default=backend, description=backend_doc))
    return dagster_config(EncoderSpec, name, doc, base=_EncoderResourceBase, fields=fields)


TextEncoderResource = _encoder_resource(
    "TextEncoderResource",
    "Text encoder for E_tex and E_llm. Default: the bundled MiniLM (offline); CLIP: backend open_clip.",
    "sentence_transformers",
    "sentence_transformers or open_clip.",
)
ImageEncoderResource = _encoder_resource(
    "ImageEncoderResource",
    "Image encoder for E_img: open_clip ViT-B-32 (LAION-2B) by default; loaded only if items have images.",
    "open_clip",
    "open_clip (the only backend with images).",
)


def _prefixed(backend: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The fields with their description prefixed by the backend they apply to."""
    return {
        name: (kind, Field(default=info.default, description=f"{backend}: {info.description[:1].lower()}{info.description[1:]}"))
        for name, (kind, info) in fields.items()
    }


_EMBEDDED_SETTINGS = ("n_threads", "generation_batch", "precision")
_OLLAMA_SETTINGS = ("host", "timeout_s", "max_retries", "max_concurrency", "think")


class _LLMResourceBase(dg.ConfigurableResource):
    """How the LLM resource's flat fields become the library's :class:`LLMConfig`: the
    shared ``backend`` and ``model``, then each backend's own settings."""

    backend: str = Field(default="embedded", description="embedded (llama.cpp in-process) or ollama.")
    model: str = Field(
        default="",
        description="embedded: smollm2 | gemma3-270m | a .gguf path (default smollm2); "
        "ollama: a model tag (default deepseek-r1:14b).",
    )

    def llm_config(self, store: ArtifactStore) -> LLMConfig:
        if self.backend == "embedded":
            embedded = EmbeddedConfig(
                model=self.model or EmbeddedConfig.model,
                model_dir=str(store.cache_dir("models")),
                **{name: getattr(self, name) for name in _EMBEDDED_SETTINGS},
            )
            return LLMConfig(backend="embedded", embedded=embedded)
        if self.backend == "ollama":
            ollama = OllamaConfig(
                model=self.model or OllamaConfig.model, **{name: getattr(self, name) for name in _OLLAMA_SETTINGS}
            )
            return LLMConfig(backend="ollama", ollama=ollama)
        raise ValueError(f"unknown LLM backend {self.backend!r}; use 'embedded' or 'ollama'")

    def fingerprint(self, store: ArtifactStore) -> str:
        """Backend and model (the GGUF file's hash and precision for embedded; host and tag for Ollama).

        Threads, batch sizes and concurrency do not change answers kept in the call log.
        """
        config = self.llm_config(store)
        if config.backend == "embedded":
            resolved = resolve_model(config.embedded.model, config.embedded.model_dir)
            return stable_hash(
                {"backend": "embedded", "gguf_sha256": resolved.sha256, "precision": config.embedded.precision}
            )
        hosts = config.ollama.resolved_hosts()
        host = hosts[0] if len(hosts) == 1 else sorted(hosts)  # one server: the fingerprint of earlier versions
        return stable_hash({"backend": "ollama", "host": host, "model": config.ollama.model})


LLMResource = dagster_config(
    LLMConfig,
    "LLMResource",
    "The LLM of the augmentation and tag stages: embedded llama.cpp (default) or an Ollama server.",
    base=_LLMResourceBase,
    fields={
        **_prefixed("embedded", dagster_fields(EmbeddedConfig, include=_EMBEDDED_SETTINGS)),
        **_prefixed("ollama", dagster_fields(OllamaConfig, include=_OLLAMA_SETTINGS)),
    },
)
