"""TEMA §III-D: relevance 1..100 of (item, tag) pairs, tags of the item's own domain.

Candidates. Each item is scored against the tags of its domain, or, with
``candidates = K > 0``, against the K of them closest to its title by cosine
similarity of a text encoder (title and tag embeddings, one encoder pass each):
a cheap prefilter that keeps the LLM's work per item small.

Methods (``method = "auto"`` picks ``logprob`` for the embedded backend, ``json``
for Ollama):

- ``json``: one call per item lists its candidates and asks for a JSON object
  ``{"tag": score, ...}`` (the JSON schema is passed to the backend). The answer is
  valid only with exactly the candidate tags as keys and integers 1..100 as values;
  anything else is retried (another seed) and then recorded as a failure.
- ``logprob``: the model completes ``Product: "<title>"\\nTag:`` after a few-shot
  prefix that lists the domain's tags; each candidate ``" <tag>\\n"`` is scored by
  its log-probability as that continuation (the newline makes it a complete tag, so
  "tea" is not credited with "tea bags"). One evaluation of the title, candidate
  tokens shared through a trie. Scores: ``max(1, round(100 * exp(lp - lp_max)))``
  over the item's candidates, i.e. the best candidate gets 100 and a tag half as
  likely as the best gets 50.

Nothing in an answer can add a tag: scores are only read for the item's own
candidates, which come from the vocabulary, and each item is its own call.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa

from cdsr_pipeline.data.schema import ITEM_TAG_SCORES
from cdsr_pipeline.llm.augment import item_key
from cdsr_pipeline.llm.backends import LLMBackend, SupportsContinuationScoring
from cdsr_pipeline.llm.calllog import (
    AnswerError,
    CallLog,
    LLMCall,
    StageResult,
    completion_answers,
    continuation_answers,
    reseed,
    run_logged_calls,
)
from cdsr_pipeline.llm.prompts import TAG_CHOICE, TAG_CHOICE_TERMINATOR, TAG_RATING, quote, rating_schema
from cdsr_pipeline.llm.types import CompletionRequest, ContinuationRequest, Prompt
from cdsr_pipeline.settings import setting

if TYPE_CHECKING:  # the one text-encoder protocol (the candidate prefilter needs identity and encode_texts)
    from cdsr_pipeline.features.encoders import TextEncoder

STAGE = "item_tag_scores"


@dataclass
class TagScoringConfig:
    method: Literal["auto", "json", "logprob"] = setting("auto", "auto (logprob embedded, json Ollama) | json | logprob.")
    candidates: int = setting(10, "K tags per item by text-encoder similarity; 0: all tags.")
    max_title_chars: int = setting(200)
    max_attempts: int = setting(3)  # json: answers per item before it is recorded as failed
    temperature: float = setting(0.0)  # json
    seed: int = setting(0)  # json; retry n uses seed + n


def resolve_method(method: str, backend: LLMBackend) -> str:
    if method == "auto":
        return "logprob" if isinstance(backend, SupportsContinuationScoring) else "json"
    if method == "logprob" and not isinstance(backend, SupportsContinuationScoring):
        raise ValueError(f"method 'logprob' needs the embedded backend (log-probabilities); {backend.kind} has none")
    if method not in ("json", "logprob"):
        raise ValueError(f"unknown tag scoring method {method!r}; use auto, json or logprob")
    return method


def select_candidates(
    titles: Sequence[str],
    title_domains: Sequence[str],
    domain_tags: Mapping[str, Sequence[str]],
    k: int,
    encoder: TextEncoder | None,
) -> list[list[str]]:
    """The tags each item is scored against: its domain's, or the ``k`` most similar of them."""
    if k <= 0 or all(len(tags) <= k for tags in domain_tags.values()):
        return [list(domain_tags[domain]) for domain in title_domains]
    if encoder is None:
        raise ValueError("candidate prefiltering (candidates > 0) needs a text encoder; pass one or set candidates=0")
    out: list[list[str]] = [[] for _ in titles]
    for domain, tags in domain_tags.items():
        members = [i for i, d in enumerate(title_domains) if d == domain]
        if not members:
            continue
        tag_vectors = encoder.encode_texts(list(tags))
        title_vectors = encoder.encode_texts([titles[i] for i in members])
        similarity = title_vectors @ tag_vectors.T
        top = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
        for row, index in enumerate(members):
            out[index] = [tags[j] for j in top[row]]
    return out


def logprob_scores(logprobs: Mapping[str, float]) -> dict[str, int]:
    """Candidate log-probabilities -> 1..100, relative to the most likely candidate."""
    if not logprobs or not all(math.isfinite(v) for v in logprobs.values()):
        raise AnswerError("missing or non-finite log-probabilities")
    best = max(logprobs.values())
    return {tag: max(1, round(100 * math.exp(lp - best))) for tag, lp in logprobs.items()}


def parse_rating(text: str, candidates: Sequence[str]) -> dict[str, int]:
    """A JSON answer with exactly ``candidates`` as keys and integer scores 1..100."""
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as error:
        raise AnswerError(f"not JSON: {error}") from None
    if not isinstance(answer, dict):
        raise AnswerError("not a JSON object")
    unknown = sorted(set(answer) - set(candidates))
    missing = sorted(set(candidates) - set(answer))
    if unknown or missing:
        raise AnswerError(f"tags not asked for: {unknown[:5]}; tags missing: {missing[:5]}")
    for tag, score in answer.items():
        if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 100:
            raise AnswerError(f"score of {tag!r} is {score!r}, not an integer in 1..100")
    return {tag: answer[tag] for tag in candidates}


def score_item_tags(
    items: pa.Table,
    domain_tags: pa.Table,
    vocabulary: pa.Table,
    backend: LLMBackend,
    call_log: CallLog,
    config: TagScoringConfig | None = None,
    encoder: TextEncoder | None = None,
) -> StageResult:
    """ITEM_TAG_SCORES for the titled items of ``items`` (ITEMS), from DOMAIN_TAGS and TAG_VOCABULARY."""
    config = config or TagScoringConfig()
    method = resolve_method(config.method, backend)
    tag_ids = dict(zip(vocabulary.column("tag").to_pylist(), vocabulary.column("tag_id").to_pylist(), strict=True))
    ranked = sorted(domain_tags.to_pylist(), key=lambda row: (row["domain"], row["rank"]))
    tags_by_domain: dict[str, list[str]] = {}
    for row in ranked:
        if row["tag"] not in tag_ids:
            raise ValueError(f"domain tag {row['tag']!r} is not in the vocabulary")
        tags_by_domain.setdefault(row["domain"], []).append(row["tag"])
    rows = [
        row
        for row in items.select(["item_id", "domain", "domain_name", "source_id", "title"]).to_pylist()
        if row["title"] and row["title"].strip()
    ]
    missing_domains = sorted({row["domain"] for row in rows} - set(tags_by_domain))
    if missing_domains:
        raise ValueError(f"no tags for domain(s) {missing_domains}")
    # Items grouped by domain: the logprob prefix (the domain's tag list) changes once.
    rows.sort(key=lambda row: (row["domain"], row["item_id"]))
    titles = [" ".join(row["title"].split())[: config.max_title_chars] for row in rows]
    candidates = select_candidates(
        titles, [row["domain"] for row in rows], tags_by_domain, config.candidates, encoder
    )
    if method == "logprob":
        calls = [
            LLMCall(
                item_key(row["domain_name"], row["source_id"]),
                ContinuationRequest(
                    Prompt(
                        TAG_CHOICE.prefix.format(tags=", ".join(tags_by_domain[row["domain"]])),
                        TAG_CHOICE.body.format(title=quote(title, config.max_title_chars)),
                    ),
                    tuple(f" {tag}{TAG_CHOICE_TERMINATOR}" for tag in cands),
                ),
            )
            for row, title, cands in zip(rows, titles, candidates, strict=True)
        ]
        records, stats = run_logged_calls(
            stage=STAGE,
            template_hash=TAG_CHOICE.hash,
            identity=backend.identity,
            calls=calls,
            execute=continuation_answers(backend.continuation_logprobs),
            parse=lambda call, text: logprob_scores(
                {c.strip(): lp for c, lp in json.loads(text).items()}
            ),
            call_log=call_log,
            max_attempts=1,  # log-probabilities are deterministic: asking again gives the same
            chunk_size=256,
        )
        template_hash = TAG_CHOICE.hash
    else:
        calls = [
            LLMCall(
                item_key(row["domain_name"], row["source_id"]),
                CompletionRequest(
                    prompt=Prompt(
                        TAG_RATING.prefix,
                        TAG_RATING.body.format(title=quote(title, config.max_title_chars), tags=json.dumps(cands)),
                    ),
                    max_tokens=16 * len(cands) + 16,
                    temperature=config.temperature,
                    seed=config.seed,
                    json_schema=rating_schema(cands),
                ),
            )
            for row, title, cands in zip(rows, titles, candidates, strict=True)
        ]
        by_key = {call.item_key: cands for call, cands in zip(calls, candidates, strict=True)}
        records, stats = run_logged_calls(
            stage=STAGE,
            template_hash=TAG_RATING.hash,
            identity=backend.identity,
            calls=calls,
            execute=completion_answers(backend.complete),
            parse=lambda call, text: parse_rating(text, by_key[call.item_key]),
            call_log=call_log,
            max_attempts=config.max_attempts,
            retry_request=reseed,
        )
        template_hash = TAG_RATING.hash
    out = []
    for row, record in zip(rows, records, strict=True):
        if record.status != "ok":
            continue
        out.extend(
            {"item_id": row["item_id"], "tag_id": tag_ids[tag], "score": score} for tag, score in record.parsed.items()
        )
    out.sort(key=lambda r: (r["item_id"], r["tag_id"]))
    notes = {
        "method": method,
        "candidates_per_item": config.candidates,
        "encoder": dict(encoder.identity) if encoder is not None and config.candidates > 0 else None,
        "items_scored": stats.ok,
        "items_without_title": items.num_rows - len(rows),
        "template_hash": template_hash,
    }
    return StageResult(pa.Table.from_pylist(out, schema=ITEM_TAG_SCORES), stats, notes)
