"""LLM-EMF §3.3: augmented item text from the SPEC's prompt.

Every item with a title gets the SPEC's sentence (domain name and JSON-quoted title
filled in) after two worked examples; the answer is one paragraph, cut at
``max_tokens``. Items without a title get status ``no_title`` and no call.

Why ``max_tokens = 48`` by default: the answer is encoded by CLIP's text tower,
whose window is 77 tokens (75 after the start/end tokens); CLIP's BPE and the small
models' tokenizers cut English product text into about as many pieces, so a longer
answer would be truncated away, and on 2 CPU cores generation is the expensive part.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from cdsr_pipeline.data.schema import AUGMENTED_TEXT
from cdsr_pipeline.llm.backends import LLMBackend
from cdsr_pipeline.llm.calllog import (
    AnswerError,
    CallLog,
    LLMCall,
    StageResult,
    completion_answers,
    reseed,
    run_logged_calls,
)
from cdsr_pipeline.llm.prompts import AUGMENTATION, AUGMENTATION_STOP, quote
from cdsr_pipeline.llm.types import CompletionRequest, Prompt
from cdsr_pipeline.settings import setting

STAGE = "augmentation"


@dataclass
class AugmentationConfig:
    max_tokens: int = setting(48, "Answer length bound (tokens).")  # see the module docstring
    temperature: float = setting(0.0)
    seed: int = setting(0, "Retry n uses seed + n.")
    repeat_penalty: float = setting(1.1)  # Ollama's default; a greedy small model otherwise loops on a phrase
    max_attempts: int = setting(2, "Answers per item before it fails.")
    max_title_chars: int = setting(200)  # longer titles are cut (the longest real ones are listings of variants)
    min_words: int = setting(3, "A shorter answer is rejected.")


def item_key(domain_name: str, source_id: str) -> str:
    """The call-log key of an item: stable across re-indexing of item ids."""
    return f"{domain_name}/{source_id}"


def augmentation_request(domain_name: str, title: str, config: AugmentationConfig) -> CompletionRequest:
    body = AUGMENTATION.body.format(domain=domain_name, title=quote(title, config.max_title_chars))
    return CompletionRequest(
        prompt=Prompt(AUGMENTATION.prefix, body),
        max_tokens=config.max_tokens,
        stop=AUGMENTATION_STOP,
        temperature=config.temperature,
        seed=config.seed,
        repeat_penalty=config.repeat_penalty,
    )


def parse_augmentation(text: str, min_words: int) -> str:
    answer = " ".join(text.split())
    if len(answer.split()) < min_words:
        raise AnswerError(f"answer has fewer than {min_words} words")
    if "Generate additional contextual information" in answer:
        raise AnswerError("answer repeats the instruction")
    return answer


def augment_items(
    items: pa.Table, backend: LLMBackend, call_log: CallLog, config: AugmentationConfig | None = None
) -> StageResult:
    """AUGMENTED_TEXT for every row of ``items`` (schema ITEMS), in the same order."""
    config = config or AugmentationConfig()
    rows = items.select(["item_id", "domain_name", "source_id", "title"]).to_pylist()
    with_title = [row for row in rows if row["title"] and row["title"].strip()]
    calls = [
        LLMCall(item_key(row["domain_name"], row["source_id"]), augmentation_request(row["domain_name"], row["title"], config))
        for row in with_title
    ]
    records, stats = run_logged_calls(
        stage=STAGE,
        template_hash=AUGMENTATION.hash,
        identity=backend.identity,
        calls=calls,
        execute=completion_answers(backend.complete),
        parse=lambda call, text: parse_augmentation(text, config.min_words),
        call_log=call_log,
        max_attempts=config.max_attempts,
        retry_request=reseed,
    )
    by_item = {row["item_id"]: record for row, record in zip(with_title, records, strict=True)}
    out = []
    for row in rows:
        record = by_item.get(row["item_id"])
        if record is None:
            out.append({"item_id": row["item_id"], "text": None, "status": "no_title", "error": None})
        elif record.status == "ok":
            out.append({"item_id": row["item_id"], "text": record.parsed, "status": "ok", "error": None})
        else:
            out.append({"item_id": row["item_id"], "text": None, "status": "failed", "error": record.error})
    notes = {"items": len(rows), "items_without_title": len(rows) - len(with_title), "template_hash": AUGMENTATION.hash}
    return StageResult(pa.Table.from_pylist(out, schema=AUGMENTED_TEXT), stats, notes)
