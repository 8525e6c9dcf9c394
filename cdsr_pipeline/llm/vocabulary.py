"""TEMA Alg. 1: a voted tag list per domain, and their union as the shared vocabulary.

For each domain the same fixed prompt asks ``queries`` (R) times for
``tags_per_domain`` (N) tags with a relevance score in [0, 1], at temperature 0 with
seeds ``seed, seed + 1, ...``. A deterministic backend (the embedded model at
temperature 0; Ollama at temperature 0 with most models) then gives R identical
answers, which is what the paper's procedure does with such a model: voting only
removes variation where the backend has some.

The answer is N lines ``tag: score`` (a fixed grammar, which the embedded backend
enforces while decoding; Ollama has only the prompt's instruction and example).
Parsing validates each line: a line that is not ``tag: score``, an unusable tag
text, a score outside [0, 1] and a repeated tag are rejected entries, counted in the
parsed result; an answer with fewer than ``min_valid_tags`` usable tags is rejected
and asked again (another seed), up to ``max_attempts``, then recorded as a failure.
Decoding uses a repeat penalty of 1.1 (Ollama's default): without it a greedy small
model writes the same tag N times. Voting keeps the tags present in at least half of the parsed answers,
ranked by votes, then mean score, then text, at most N per domain. A domain with no
parsed answer or no kept tag is an error (:class:`VocabularyError`).

Tag ids of the shared vocabulary follow the alphabetical order of the normalized
tags, so they depend only on the set of tags.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from cdsr_pipeline.data.schema import DOMAIN_TAGS, TAG_VOCABULARY
from cdsr_pipeline.llm.backends import LLMBackend
from cdsr_pipeline.llm.calllog import (
    AnswerError,
    CallLog,
    CallStats,
    LLMCall,
    completion_answers,
    reseed,
    run_logged_calls,
)
from cdsr_pipeline.llm.prompts import VOCABULARY, VOCABULARY_STOP, vocabulary_grammar, vocabulary_prompt
from cdsr_pipeline.llm.types import CompletionRequest, Prompt
from cdsr_pipeline.settings import setting

STAGE = "domain_vocabulary"
MAX_TAG_CHARS = 40
MAX_TAG_WORDS = 4
_TAG_TEXT = re.compile(r"^[a-z0-9](?:[a-z0-9 &'/+-]*[a-z0-9])?$")
_LINE = re.compile(r"^(?P<tag>[^:]+):\s*(?P<score>\d+(?:\.\d+)?)$")


class VocabularyError(RuntimeError):
    """A domain ended up with no tag."""


@dataclass
class VocabularyConfig:
    tags_per_domain: int = setting(20, "N: tags asked for, and kept at most.")
    queries: int = setting(5, "R: queries per domain.")
    temperature: float = setting(0.0)  # the paper's T = 0
    seed: int = setting(0, "Query r uses seed + r.")  # retries add 1000 * attempt
    # Ollama's default. Without it a greedy small model repeats one tag N times.
    repeat_penalty: float = setting(1.1)
    max_attempts: int = setting(3)
    min_valid_tags: int | None = setting(None, "Usable tags an answer needs; empty: N // 4.")
    max_tokens: int | None = setting(None, "Answer length bound; empty: 10 per tag + 16 (a line costs 5-8 tokens).")

    def required_tags(self) -> int:
        return self.min_valid_tags if self.min_valid_tags is not None else max(1, self.tags_per_domain // 4)


@dataclass
class VocabularyResult:
    domain_tags: pa.Table  # DOMAIN_TAGS
    vocabulary: pa.Table  # TAG_VOCABULARY
    stats: CallStats


def normalize_tag(text: str) -> str:
    """Lowercase, single spaces, no surrounding punctuation."""
    return " ".join(text.lower().split()).strip(" .,;:!?\"'`()[]{}*-_#")


def parse_tag_list(text: str, required: int) -> dict[str, list]:
    """``{"tags": [[tag, score], ...], "rejected": [reason, ...]}`` or :class:`AnswerError`.

    Every non-empty line must read ``tag: score``; other lines, unusable tags, scores
    outside [0, 1] and repeats are rejected entries.
    """
    tags: list[list] = []
    seen: set[str] = set()
    rejected: list[str] = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        match = _LINE.match(line.strip())
        if match is None:
            rejected.append(f"not 'tag: score': {line!r}"[:120])
            continue
        tag, score = normalize_tag(match["tag"]), float(match["score"])
        if not _TAG_TEXT.match(tag) or len(tag) > MAX_TAG_CHARS or len(tag.split()) > MAX_TAG_WORDS:
            rejected.append(f"unusable tag {match['tag']!r}"[:120])
        elif not 0 <= score <= 1:
            rejected.append(f"score {score} of {tag!r} not in [0, 1]")
        elif tag in seen:
            rejected.append(f"repeated tag {tag!r}"[:120])
        else:
            seen.add(tag)
            tags.append([tag, score])
    if len(tags) < required:
        raise AnswerError(f"{len(tags)} usable tags, {required} needed ({len(rejected)} lines rejected)")
    return {"tags": tags, "rejected": rejected}


def vote(answers: list[list[list]], max_tags: int) -> list[tuple[str, int, float]]:
    """(tag, votes, mean score) kept by majority over ``answers``, best first."""
    votes: dict[str, int] = {}
    scores: dict[str, float] = {}
    for answer in answers:
        for tag, score in answer:
            votes[tag] = votes.get(tag, 0) + 1
            scores[tag] = scores.get(tag, 0.0) + score
    needed = math.ceil(len(answers) / 2)
    kept = [(tag, count, scores[tag] / count) for tag, count in votes.items() if count >= needed]
    kept.sort(key=lambda entry: (-entry[1], -entry[2], entry[0]))
    return kept[:max_tags]


def domain_names(items: pa.Table) -> dict[str, str]:
    """Domain code -> domain name, from an ITEMS table."""
    pairs = items.select(["domain", "domain_name"]).to_pylist()
    return dict(sorted({(row["domain"], row["domain_name"]) for row in pairs}))


def build_tag_vocabularies(
    domains: Mapping[str, str],
    backend: LLMBackend,
    call_log: CallLog,
    config: VocabularyConfig | None = None,
) -> VocabularyResult:
    """DOMAIN_TAGS for each ``{code: name}`` domain and the shared TAG_VOCABULARY."""
    config = config or VocabularyConfig()
    n_tags = config.tags_per_domain
    grammar = vocabulary_grammar(n_tags)
    calls = []
    for code, name in domains.items():
        prefix, body = vocabulary_prompt(name, n_tags)
        for query in range(config.queries):
            request = CompletionRequest(
                prompt=Prompt(prefix, body),
                max_tokens=config.max_tokens or 10 * n_tags + 16,
                stop=VOCABULARY_STOP,
                temperature=config.temperature,
                seed=config.seed + query,
                repeat_penalty=config.repeat_penalty,
                grammar=grammar,
            )
            calls.append((code, LLMCall(f"{name}/query-{query}", request)))
    required = config.required_tags()
    records, stats = run_logged_calls(
        stage=STAGE,
        template_hash=VOCABULARY.hash,
        identity=backend.identity,
        calls=[call for _, call in calls],
        execute=completion_answers(backend.complete),
        parse=lambda call, text: parse_tag_list(text, required),
        call_log=call_log,
        max_attempts=config.max_attempts,
        # Far from the seeds of the other queries, so a retry is not another query's twin.
        retry_request=lambda request, attempt: reseed(request, 1000 * attempt),
    )
    rows = []
    for code, name in domains.items():
        answers = [
            record.parsed["tags"]
            for (domain, _), record in zip(calls, records, strict=True)
            if domain == code and record.status == "ok"
        ]
        if not answers:
            raise VocabularyError(
                f"domain {code} ({name}): none of the {config.queries} answers parsed; "
                f"failures: {[f for f in stats.failures if f['item_key'].startswith(name + '/')][:3]}"
            )
        kept = vote(answers, n_tags)
        if not kept:
            raise VocabularyError(f"domain {code} ({name}): no tag is in at least half of {len(answers)} answers")
        rows.extend(
            {"domain": code, "tag": tag, "votes": count, "mean_score": mean, "rank": rank}
            for rank, (tag, count, mean) in enumerate(kept, start=1)
        )
    domain_tags = pa.Table.from_pylist(rows, schema=DOMAIN_TAGS)
    tags = sorted({row["tag"] for row in rows})
    vocabulary = pa.Table.from_pylist(
        [{"tag_id": tag_id, "tag": tag} for tag_id, tag in enumerate(tags)], schema=TAG_VOCABULARY
    )
    return VocabularyResult(domain_tags, vocabulary, stats)
