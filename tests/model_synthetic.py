"""A small synthetic cross-domain dataset with a learnable pattern, for the model tests.

Each user walks through both domains: at every step a coin picks the domain, and
within a domain the items follow a fixed cycle (item k is followed by item k+1,
modulo the domain's size) from a random start. The next item of a domain is thus
determined by the last item of that domain: the S^X / S^Y prefixes carry it, and
popularity (uniform starts) is near chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from cdsr_pipeline.data import schema
from cdsr_pipeline.data.sequences import DOMAINS_FILE, ITEMS_OUT, STATS_FILE, split_file, split_statistics
from cdsr_pipeline.model.data import FeatureInputs
from cdsr_pipeline.storage import write_parquet_atomic


def _walk(rng: np.random.Generator, n_a: int, n_b: int, length: int) -> list[int]:
    a, b = int(rng.integers(n_a)), int(rng.integers(n_b))
    items = []
    for _ in range(length):
        if rng.random() < 0.5:
            items.append(a % n_a)
            a += 1
        else:
            items.append(n_a + b % n_b)
            b += 1
    return items


def write_synthetic_sequences(
    out_dir: Path,
    *,
    n_a: int = 20,
    n_b: int = 30,
    train_users: int = 300,
    eval_users: int = 60,
    seed: int = 0,
    names: tuple[str, str] = ("Alpha", "Beta"),
) -> Path:
    """A ``cdsr_sequences`` folder; valid/test users are unseen (as in LLMCDSR)."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = pl.DataFrame(
        {
            "item_id": np.arange(n_a + n_b),
            "domain": ["A"] * n_a + ["B"] * n_b,
            "domain_name": [names[0]] * n_a + [names[1]] * n_b,
            "source_id": [f"i{i}" for i in range(n_a + n_b)],
            "title": [f"item {i}" for i in range(n_a + n_b)],
            "description": [None] * (n_a + n_b),
            "image_ref": [None] * (n_a + n_b),
        }
    )
    write_parquet_atomic(items.to_arrow().cast(schema.ITEMS), out_dir / ITEMS_OUT)
    for split, users in (("train", train_users), ("valid", eval_users), ("test", eval_users)):
        sequences = [_walk(rng, n_a, n_b, int(rng.integers(6, 16))) for _ in range(users)]
        frame = pl.DataFrame(
            {
                "user": [f"{split}:{u}" for u in range(users)],
                "sequence": sequences,
                "timestamps": [None] * users,
                "user_domains": ["both"] * users,
                "target_domain": [None if split == "train" else ("A" if s[-1] < n_a else "B") for s in sequences],
            },
            schema_overrides={"timestamps": pl.List(pl.Int64), "target_domain": pl.String},
        )
        write_parquet_atomic(frame.to_arrow().cast(schema.SEQUENCES), out_dir / split_file(split))
    domains = {
        "dataset": "synthetic-cycles",
        "A": {"name": names[0], "num_items": n_a, "first_id": 0},
        "B": {"name": names[1], "num_items": n_b, "first_id": n_a},
    }
    (out_dir / DOMAINS_FILE).write_text(json.dumps(domains))
    (out_dir / STATS_FILE).write_text(json.dumps(split_statistics(out_dir, protocol="synthetic")))
    return out_dir


def write_synthetic_features(out_dir: Path, num_items: int, *, dim: int = 8, num_tags: int = 6, seed: int = 0) -> FeatureInputs:
    """Random text-like embeddings (tex, llm; item 0 has no llm text) and a tag matrix."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("tex", "llm"):
        vectors = rng.normal(size=(num_items, dim)).astype(np.float32)
        present = np.ones(num_items, dtype=bool)
        if name == "llm":
            present[0] = False
        embedding = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim)
        embedding = pa.array([row if ok else None for row, ok in zip(embedding.to_pylist(), present)], pa.list_(pa.float32(), dim))
        table = pa.table({"item_id": np.arange(num_items), "embedding": embedding, "present": present}, schema=schema.embeddings_schema(dim))
        paths[name] = out_dir / f"{name}.parquet"
        write_parquet_atomic(table, paths[name])
    item_ids = np.repeat(np.arange(num_items), 2)
    tag_ids = np.stack([np.arange(num_items) % num_tags, (np.arange(num_items) + 1) % num_tags], 1).ravel()
    tags = pl.DataFrame({"item_id": item_ids, "tag_id": tag_ids, "weight": np.tile([0.7, 0.3], num_items)})
    write_parquet_atomic(tags.to_arrow().cast(schema.ITEM_TAG_MATRIX), out_dir / "tags.parquet")
    vocabulary = pl.DataFrame({"tag_id": np.arange(num_tags), "tag": [f"tag{i}" for i in range(num_tags)]})
    write_parquet_atomic(vocabulary.to_arrow().cast(schema.TAG_VOCABULARY), out_dir / "tag_vocabulary.parquet")
    return FeatureInputs(
        tex=paths["tex"],
        llm=paths["llm"],
        tags=out_dir / "tags.parquet",
        tag_vocabulary=out_dir / "tag_vocabulary.parquet",
        provenance={"tex": "random (test)", "llm": "random (test)", "tag": "item id modulo (test)"},
    )
