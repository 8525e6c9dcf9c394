"""LLM stages (no Dagster here): backends, the call log, and the functions the assets call.

- :func:`open_backend` (``LLMConfig``): the embedded llama.cpp model (default) or Ollama.
- :class:`CallLog`: the DuckDB record of every call (``<storage>/cache/llm_calls.duckdb``);
  :func:`llm_session` opens a backend and the storage's call log, one writer at a time.
- :func:`augment_items` -> AUGMENTED_TEXT (LLM-EMF §3.3).
- :func:`build_tag_vocabularies` -> DOMAIN_TAGS, TAG_VOCABULARY (TEMA Alg. 1).
- :func:`score_item_tags` -> ITEM_TAG_SCORES (TEMA §III-D).
"""

from cdsr_pipeline.llm.augment import AugmentationConfig, augment_items
from cdsr_pipeline.llm.backends import (
    BackendUnavailableError,
    EmbeddedBackend,
    EmbeddedConfig,
    LLMBackend,
    LLMConfig,
    OllamaBackend,
    OllamaConfig,
    open_backend,
)
from cdsr_pipeline.llm.calllog import CallLog, CallLogLockedError, CallStats, StageResult
from cdsr_pipeline.llm.session import CALL_LOG_FILE, call_log_path, llm_session, locked_call_log
from cdsr_pipeline.llm.tag_scoring import TagScoringConfig, score_item_tags
from cdsr_pipeline.llm.vocabulary import (
    VocabularyConfig,
    VocabularyError,
    VocabularyResult,
    build_tag_vocabularies,
    domain_names,
)

__all__ = [
    "CALL_LOG_FILE",
    "AugmentationConfig",
    "BackendUnavailableError",
    "CallLog",
    "CallLogLockedError",
    "CallStats",
    "EmbeddedBackend",
    "EmbeddedConfig",
    "LLMBackend",
    "LLMConfig",
    "OllamaBackend",
    "OllamaConfig",
    "StageResult",
    "TagScoringConfig",
    "VocabularyConfig",
    "VocabularyError",
    "VocabularyResult",
    "augment_items",
    "build_tag_vocabularies",
    "call_log_path",
    "domain_names",
    "llm_session",
    "locked_call_log",
    "open_backend",
    "score_item_tags",
]
