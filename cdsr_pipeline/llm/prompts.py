"""Every prompt of the LLM stages, in one place.

Prompts are few-shot completions: a shared prefix (instructions and worked examples,
whose KV cache the embedded backend keeps) and a per-item body ending where the
answer starts. Small models follow this far better than chat instructions; a strong
model served by Ollama receives the same text as its user message.

Item titles are data, never instructions: :func:`quote` collapses them to one line
and writes them as a JSON string literal, so a title can neither close its quotes
nor start a new line of the prompt (it cannot fake an ``Answer:`` or a new example).

Each template's :attr:`PromptTemplate.hash` goes into the call log: editing a
template invalidates exactly the answers obtained with it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cdsr_pipeline.storage import stable_hash

_SPACES = re.compile(r"\s+")
# C0 and C1 controls, zero-width characters and bidirectional overrides/isolates: they
# can hide or reorder text in the prompt (a title is data, never layout).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def quote(text: str, max_chars: int) -> str:
    """``text`` as a one-line JSON string literal of at most ``max_chars`` characters (before escaping)."""
    flat = _SPACES.sub(" ", _CONTROL.sub(" ", text)).strip()[:max_chars].rstrip()
    return json.dumps(flat, ensure_ascii=False)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    prefix: str
    body: str

    @property
    def hash(self) -> str:
        return stable_hash({"name": self.name, "prefix": self.prefix, "body": self.body})[:16]


# -- LLM-EMF augmentation --------------------------------------------------------
# The SPEC's sentence verbatim; [domain] and [title] are filled per item.
AUGMENTATION_INSTRUCTION = (
    "Generate additional contextual information for an item of type {domain} with {title}. "
    "Provide detailed insights and keywords about the item's features. The output should "
    "include specific attributes and potential users that could enhance the understanding "
    "of the item in a cross-domain recommendation context."
)
_AUGMENTATION_EXAMPLES = (
    (
        "Toys",
        "LEGO Classic Medium Creative Brick Box 10696",
        "A 484-piece set of classic LEGO bricks in 35 colors for open-ended building. "
        "Keywords: building blocks, creativity, STEM, colorful bricks. "
        "Potential users: children aged 4 and up, parents, teachers, LEGO fans.",
    ),
    (
        "Sports",
        "Coleman Sundome 4-Person Dome Tent",
        "A weatherproof dome tent for four people that sets up in about ten minutes. "
        "Keywords: camping, outdoor shelter, family tent, waterproof. "
        "Potential users: families, festival goers, beginner campers, hikers.",
    ),
)
AUGMENTATION = PromptTemplate(
    name="augmentation",
    prefix="".join(
        AUGMENTATION_INSTRUCTION.format(domain=domain, title=json.dumps(title)) + "\nAnswer: " + answer + "\n\n"
        for domain, title, answer in _AUGMENTATION_EXAMPLES
    ),
    body=AUGMENTATION_INSTRUCTION + "\nAnswer:",
)
# A new example starts after a blank line; a small model that goes on writing one is stopped.
AUGMENTATION_STOP = ("\n\n", "\nGenerate additional contextual information")


# -- TEMA Alg. 1: domain tag lists ---------------------------------------------------
_VOCABULARY_EXAMPLE_DOMAIN = "Toys"
_VOCABULARY_EXAMPLE_TAGS = (
    ("building blocks", 0.95), ("board games", 0.93), ("dolls", 0.92), ("puzzles", 0.9),
    ("action figures", 0.89), ("educational toys", 0.88), ("outdoor toys", 0.86), ("plush toys", 0.85),
    ("remote control cars", 0.84), ("arts and crafts", 0.83), ("baby toys", 0.82), ("pretend play", 0.8),
    ("card games", 0.79), ("science kits", 0.78), ("musical toys", 0.76), ("ride-on toys", 0.75),
    ("bath toys", 0.73), ("party supplies", 0.7), ("collectibles", 0.68), ("water toys", 0.66),
    ("dress-up costumes", 0.64), ("toy vehicles", 0.63), ("play kitchens", 0.6), ("magic kits", 0.58),
    ("kites", 0.55), ("yo-yos", 0.5), ("stacking toys", 0.48), ("marble runs", 0.45),
    ("sand toys", 0.42), ("fidget toys", 0.4),
)
VOCABULARY_INSTRUCTION = (
    "List {n} semantic tags that describe the items of a product domain, one per line: a short "
    "lowercase phrase of one to three words, a colon, and the tag's relevance to the domain as a "
    "score between 0 and 1.\n\n"
)
VOCABULARY = PromptTemplate(
    name="domain_vocabulary",
    prefix=VOCABULARY_INSTRUCTION + "Domain: {example_domain}\n{example_lines}\n",
    body="Domain: {domain}\n",
)
# The answer's grammar, ``tag: score`` lines; the embedded backend enforces it.
VOCABULARY_GRAMMAR = """root ::= line{{{n}}}
line ::= tag ": " score "\\n"
tag ::= word (" " word){{0,2}}
word ::= [a-z0-9] [a-z0-9'&-]{{0,19}}
score ::= "0." [0-9] [0-9] | "1.00"
"""
VOCABULARY_STOP = ("\n\n",)


def vocabulary_prompt(domain_name: str, n_tags: int) -> tuple[str, str]:
    """(prefix, body) asking for ``n_tags`` tags of ``domain_name``."""
    example = _VOCABULARY_EXAMPLE_TAGS[:n_tags]
    prefix = VOCABULARY.prefix.format(
        n=n_tags,
        example_domain=json.dumps(_VOCABULARY_EXAMPLE_DOMAIN),
        example_lines="".join(f"{tag}: {score:.2f}\n" for tag, score in example),
    )
    return prefix, VOCABULARY.body.format(domain=quote(domain_name, 80))


def vocabulary_grammar(n_tags: int) -> str:
    return VOCABULARY_GRAMMAR.format(n=n_tags)


# -- TEMA §III-D: item-tag relevance --------------------------------------------------
_SCORING_EXAMPLE_TAGS = ("building blocks", "dolls", "puzzles", "outdoor toys", "arts and crafts", "board games")
_SCORING_EXAMPLES = (
    ("LEGO Classic Medium Creative Brick Box 10696", "building blocks"),
    ("Crayola Washable Markers, 10 Count", "arts and crafts"),
    ("Ravensburger Disney Castle 1000 Piece Jigsaw Puzzle", "puzzles"),
)
# Log-probability method: the model writes the best tag for a product; each
# candidate's probability as that continuation is its relevance.
TAG_CHOICE = PromptTemplate(
    name="tag_choice",
    prefix="Each product gets the tag from the list that describes it best.\n\n"
    + "Tags: " + ", ".join(_SCORING_EXAMPLE_TAGS) + "\n"
    + "".join(f"Product: {json.dumps(title)}\nTag: {tag}\n" for title, tag in _SCORING_EXAMPLES)
    + "\nTags: {tags}\n",
    body="Product: {title}\nTag:",
)
TAG_CHOICE_TERMINATOR = "\n"

# JSON method: the model states a 1..100 score for every candidate tag.
_RATING_EXAMPLE = {"building blocks": 98, "dolls": 3, "outdoor toys": 10, "arts and crafts": 62}
TAG_RATING = PromptTemplate(
    name="tag_rating",
    prefix="Rate how well each tag describes the product, from 1 (unrelated) to 100 (perfect match). "
    "Answer with a JSON object that maps every listed tag to an integer score.\n\n"
    + f"Product: {json.dumps(_SCORING_EXAMPLES[0][0])}\nTags: {json.dumps(list(_RATING_EXAMPLE))}\n"
    + f"Answer: {json.dumps(_RATING_EXAMPLE)}\n\n",
    body="Product: {title}\nTags: {tags}\nAnswer:",
)


def rating_schema(tags: list[str]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {tag: {"type": "integer", "minimum": 1, "maximum": 100} for tag in tags},
        "required": list(tags),
        "additionalProperties": False,
    }
