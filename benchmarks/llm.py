"""Throughput of the LLM stages with the embedded model, extrapolated to Food-Kitchen.

    python benchmarks/llm.py --items 200
    python benchmarks/llm.py --precision f16 bf16     # both weight precisions, answers compared

Reads real titles from ``shared/data/llmcdsr-food-kitchen/items.tsv`` when present
(a seeded sample of ``--items``), else the test fixture's 12 titles. Measures, each
on a fresh call log (nothing served from cache):

- tag scoring (``logprob`` method, ``--candidates`` tags per item; the candidates
  are the domain's first K tags of a fixed 20-tag list, so the LLM work per item is
  what a prefiltered run does, without timing the text encoder);
- augmentation (``--aug-items`` of the sample, the default 48-token answers).

Prints items/s, the extrapolated time for the full release (36,298 items) and the
peak resident memory of the process (``resource.getrusage`` ru_maxrss: the model,
its KV cache and Python, i.e. what the machine must have free).
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdsr_pipeline.data.schema import DOMAIN_TAGS, ITEMS, TAG_VOCABULARY  # noqa: E402
from cdsr_pipeline.llm import (  # noqa: E402
    AugmentationConfig,
    CallLog,
    EmbeddedBackend,
    EmbeddedConfig,
    TagScoringConfig,
    augment_items,
    score_item_tags,
)

RELEASE_ITEMS = 36_298
SHARED_ITEMS = ROOT.parent / "shared" / "data" / "llmcdsr-food-kitchen" / "items.tsv"
FIXTURE = ROOT / "tests" / "fixtures" / "llm_titles.tsv"
DOMAIN_NAMES = {"A": "Grocery and Gourmet Food", "B": "Home and Kitchen"}
# Plausible vocabularies (what a strong model gives); only their token lengths matter here.
TAGS = {
    "A": ["coffee", "tea", "snacks", "candy", "breakfast cereal", "baking supplies", "spices", "condiments",
          "pasta", "canned food", "beverages", "chocolate", "organic food", "gluten free", "baby food",
          "sauces", "nuts", "dried fruit", "cooking oil", "gift baskets"],
    "B": ["cookware", "bakeware", "cutlery", "kitchen utensils", "small appliances", "coffee makers", "glassware",
          "dinnerware", "food storage", "bedding", "bath towels", "home decor", "cleaning supplies", "storage bins",
          "lighting", "furniture", "vacuum cleaners", "water filters", "knife sets", "table linens"],
}


def load_titles(n: int, seed: int) -> tuple[pa.Table, str]:
    source = SHARED_ITEMS if SHARED_ITEMS.is_file() else FIXTURE
    rows = []
    for line in source.read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or line.startswith("domain\t"):
            continue
        fields = line.split("\t")
        if source == SHARED_ITEMS:  # domain, local_id, global_id, asin, title
            domain, _, gid, asin, title = fields
        else:  # domain, global_id, asin, title
            domain, gid, asin, title = fields
        rows.append({"item_id": int(gid), "domain": domain, "domain_name": DOMAIN_NAMES[domain], "source_id": asin,
                     "title": title, "description": None, "image_ref": None})
    sample = random.Random(seed).sample(rows, min(n, len(rows)))
    return pa.Table.from_pylist(sample, schema=ITEMS).sort_by("item_id"), str(source)


def tag_tables(k: int) -> tuple[pa.Table, pa.Table]:
    rows = [{"domain": d, "tag": t, "votes": 1, "mean_score": 1.0, "rank": r}
            for d, tags in TAGS.items() for r, t in enumerate(tags[:k], 1)]
    vocabulary = sorted({row["tag"] for row in rows})
    return (pa.Table.from_pylist(rows, schema=DOMAIN_TAGS),
            pa.Table.from_pylist([{"tag_id": i, "tag": t} for i, t in enumerate(vocabulary)], schema=TAG_VOCABULARY))


def report(stage: str, n: int, seconds: float, engine=None, before: tuple[int, int] = (0, 0)) -> None:
    rate = n / seconds
    hours = RELEASE_ITEMS / rate / 3600
    print(f"{stage:<14} {n:>5} items in {seconds:7.1f}s = {rate:6.2f} items/s "
          f"-> full release ({RELEASE_ITEMS} items): {hours:5.2f} h")
    if engine is not None:
        print_share_of_peak(engine, seconds, engine.tokens_evaluated - before[0], engine.decode_calls - before[1])


def print_share_of_peak(engine, seconds: float, tokens: int, calls: int) -> None:
    """The stage's arithmetic rate (about 2 x parameters per token llama.cpp evaluated) as a
    share of this machine's matrix-product peak at the model's hot shape (tokens of one
    llama_decode x hidden x 4 hidden), measured here in fp32 and bf16 with torch."""
    import torch

    from cdsr_pipeline.hardware import matmul_peak_gflops

    if not tokens or not calls:
        return
    achieved = 2 * engine.n_params * tokens / seconds / 1e9
    rows = max(1, tokens // calls)
    peaks = {
        label: matmul_peak_gflops(torch.device("cpu"), dtype, rows, engine.n_embd, 4 * engine.n_embd)
        for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    print(f"               {tokens:,} tokens in {calls:,} llama_decode calls ({rows} per call): about "
          f"{achieved:.0f} GFLOP/s = {achieved / peaks['fp32']:.0%} of the fp32 matrix-product peak at "
          f"{rows}x{engine.n_embd}x{4 * engine.n_embd} ({peaks['fp32']:.0f} GFLOP/s), "
          f"{achieved / peaks['bf16']:.0%} of the bf16 one ({peaks['bf16']:.0f}); torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")


def _counts(engine) -> tuple[int, int]:
    return (engine.tokens_evaluated, engine.decode_calls) if engine is not None else (0, 0)


def run_stages(items: pa.Table, config: EmbeddedConfig, args: argparse.Namespace) -> dict[str, list]:
    """Tag scoring and augmentation on a fresh call log, timed; the answers, for comparison."""
    started = time.perf_counter()
    backend = EmbeddedBackend(config)
    print(f"\n[{config.precision}] model load: {time.perf_counter() - started:.1f}s, identity {backend.identity}")
    domain_tags, vocabulary = tag_tables(args.candidates)
    answers: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        with CallLog(Path(tmp) / "calls.duckdb") as call_log:
            engine = getattr(backend, "_engine", None)
            before, started = _counts(engine), time.perf_counter()
            scored = score_item_tags(items, domain_tags, vocabulary, backend, call_log, TagScoringConfig(candidates=0))
            report("tag scoring", items.num_rows, time.perf_counter() - started, engine, before)
            print(f"               {scored.table.num_rows} scores, {scored.stats.failed} failures")
            answers["tag scores"] = sorted(
                zip(scored.table["item_id"].to_pylist(), scored.table["tag_id"].to_pylist(), scored.table["score"].to_pylist())
            )
            if args.aug_items:
                subset = items.slice(0, args.aug_items)
                before, started = _counts(engine), time.perf_counter()
                augmented = augment_items(subset, backend, call_log, AugmentationConfig(max_tokens=args.max_tokens))
                report("augmentation", subset.num_rows, time.perf_counter() - started, engine, before)
                example = augmented.table.to_pylist()[0]
                print(f"               {augmented.stats.failed} failures; e.g. {example['text']!r}")
                answers["augmented texts"] = sorted(zip(augmented.table["item_id"].to_pylist(), augmented.table["text"].to_pylist()))
    backend.close()
    return answers


def compare_answers(by_precision: dict[str, dict[str, list]]) -> None:
    """How many answers each precision shares with the first one given."""
    (first, reference), *others = by_precision.items()
    for precision, answers in others:
        for stage, rows in answers.items():
            same = sum(a == b for a, b in zip(reference[stage], rows))
            print(f"{precision} against {first}, {stage}: {same}/{len(rows)} identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=200, help="titles sampled for tag scoring")
    parser.add_argument("--aug-items", type=int, default=32, help="of those, how many to augment (0: skip)")
    parser.add_argument("--candidates", type=int, default=10, help="tags scored per item (K)")
    parser.add_argument("--model", default="smollm2", help="smollm2 | gemma3-270m | path to a .gguf")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--generation-batch", type=int, default=EmbeddedConfig.generation_batch)
    parser.add_argument("--max-tokens", type=int, default=AugmentationConfig.max_tokens)
    parser.add_argument(
        "--precision", nargs="+", default=[EmbeddedConfig.precision], choices=["f16", "bf16", "as_shipped"],
        help="the model's weights; several: each in turn on the same titles, then their answers compared",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    items, source = load_titles(args.items, args.seed)
    print(f"data: {items.num_rows} titles sampled (seed {args.seed}) from {source}")
    print(f"model: {args.model}, threads {args.threads}, generation batch {args.generation_batch}, "
          f"scoring sequences {EmbeddedConfig.scoring_sequences}, n_ctx {EmbeddedConfig.n_ctx}, n_batch {EmbeddedConfig.n_batch}")
    print(f"tag scoring: logprob, K={args.candidates} candidates per item; augmentation: max_tokens={args.max_tokens}")
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start (shared machines vary)")
    by_precision = {}
    for precision in args.precision:
        config = EmbeddedConfig(
            model=args.model, n_threads=args.threads, generation_batch=args.generation_batch, precision=precision
        )
        by_precision[precision] = run_stages(items, config, args)
    if len(by_precision) > 1:
        print()
        compare_answers(by_precision)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"load average at end {os.getloadavg()[0]:.2f}; peak RSS {peak_mib:.0f} MiB (getrusage ru_maxrss)")


if __name__ == "__main__":
    main()
