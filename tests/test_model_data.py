"""Sequences -> arrays -> batches: truncation, X/Y prefix alignment, query sharing, features."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from cdsr_pipeline.data import schema
from cdsr_pipeline.data.sequences import DOMAINS_FILE, split_file
from cdsr_pipeline.model.data import (
    Domains,
    FeatureInputs,
    SequenceArrays,
    evaluation_batches,
    load_item_features,
    load_sequences,
    make_batch,
    training_batches,
)
from cdsr_pipeline.storage import write_parquet_atomic

# domain A = items 0..2, domain B = items 3..6
DOMAINS = Domains("toy", ("Alpha", "Beta"), (3, 4))
PAD = DOMAINS.num_items


def _write_split(folder, split, sequences):
    frame = pl.DataFrame(
        {
            "user": [f"u{i}" for i in range(len(sequences))],
            "sequence": sequences,
            "timestamps": [None] * len(sequences),
            "user_domains": ["both"] * len(sequences),
            "target_domain": [None] * len(sequences),
        },
        schema_overrides={"timestamps": pl.List(pl.Int64), "target_domain": pl.String},
    )
    write_parquet_atomic(frame.to_arrow().cast(schema.SEQUENCES), folder / split_file(split))


@pytest.fixture
def toy_dir(tmp_path):
    _write_split(tmp_path, "train", [[0, 3, 4, 1, 5, 2], [6, 5, 4, 3, 2, 1, 0]])
    _write_split(tmp_path, "valid", [[0, 1, 3], [4]])
    domains = {"dataset": "toy", "A": {"name": "Alpha", "num_items": 3, "first_id": 0}, "B": {"name": "Beta", "num_items": 4, "first_id": 3}}
    (tmp_path / DOMAINS_FILE).write_text(json.dumps(domains))
    return tmp_path


def test_training_rows_have_a_target_at_every_position_and_are_truncated(toy_dir):
    arrays = load_sequences(toy_dir, "train", max_len=4)
    assert arrays.lengths.tolist() == [4, 4]
    assert arrays.inputs[0].tolist() == [3, 4, 1, 5]  # the last 4 inputs of [0, 3, 4, 1, 5]
    assert arrays.targets[0].tolist() == [4, 1, 5, 2]
    assert arrays.num_examples == 8


def test_evaluation_rows_have_one_target_after_the_history(toy_dir):
    arrays = load_sequences(toy_dir, "valid", max_len=50)
    assert len(arrays) == 1  # [4] has no history: skipped
    assert arrays.inputs[0, :2].tolist() == [0, 1]
    assert arrays.targets[0, :2].tolist() == [-1, 3]
    assert arrays.last_targets.tolist() == [3]


def test_prefixes_of_each_view_are_aligned_with_merged_positions():
    # merged inputs 0 3 4 1 5 -> targets 3 4 1 5 2 (domains B B A B A)
    arrays = SequenceArrays(
        inputs=np.array([[0, 3, 4, 1, 5]]), targets=np.array([[3, 4, 1, 5, 2]]), lengths=np.array([5])
    )
    batch = make_batch(arrays, np.array([0]), DOMAINS, ("X", "Y", "XY"))
    assert batch.items["X"].tolist() == [[0, 1]]
    assert batch.items["Y"].tolist() == [[3, 4, 5]]
    assert batch.items["XY"].tolist() == [[0, 3, 4, 1, 5]]

    def prefixes(domain):
        """Per example and view: the encoder position read, or None for an empty prefix."""
        ex = batch.domains[domain]
        positions = [ex.query_positions[v] for v in batch.views]
        flat = np.concatenate([p.numpy() for p in positions])
        return [[None if q < 0 else int(flat[q]) for q in ex.example_query[:, e].tolist()] for e in range(ex.num_examples)]

    # domain A targets at merged t=2 (item 1) and t=4 (item 2)
    assert batch.domains[0].targets.tolist() == [1, 2]
    assert prefixes(0) == [[0, 1, 2], [1, 2, 4]]  # [X index, Y index, merged index]
    # domain B targets at t=0 (3), t=1 (4), t=3 (5); at t=0 there is no Y item yet
    assert batch.domains[1].targets.tolist() == [0, 1, 2]
    assert prefixes(1) == [[0, None, 0], [0, 0, 1], [1, 1, 3]]


def test_examples_sharing_a_prefix_and_domain_share_one_query():
    arrays = SequenceArrays(
        inputs=np.array([[0, 3, 4, 1, 5]]), targets=np.array([[3, 4, 1, 5, 2]]), lengths=np.array([5])
    )
    batch = make_batch(arrays, np.array([0]), DOMAINS, ("X", "Y", "XY"))
    b = batch.domains[1]
    # t=0 and t=1 both read X position 0 and predict domain B: one query
    assert b.query_positions["X"].tolist() == [0, 1]
    assert b.example_query[0].tolist() == [0, 0, 1]
    assert b.example_query[1].tolist() == [-1, 2, 3]  # offset by the two X queries
    assert b.example_query[2].tolist() == [4, 5, 6]


def test_rows_of_a_batch_are_padded_and_read_in_their_own_row():
    arrays = SequenceArrays(
        inputs=np.array([[3, 0, -1], [1, 2, 6]]),
        targets=np.array([[0, 4, -1], [2, 6, 0]]),
        lengths=np.array([2, 3]),
    )
    batch = make_batch(arrays, np.array([0, 1]), DOMAINS, ("X", "Y", "XY"))
    assert batch.items["XY"].tolist() == [[3, 0, PAD], [1, 2, 6]]
    assert batch.items["X"].tolist() == [[0, PAD], [1, 2]]
    assert batch.items["Y"].tolist() == [[3], [6]]
    a = batch.domains[0]
    assert a.targets.tolist() == [0, 2, 0]
    assert a.query_rows["XY"].tolist() == [0, 1, 1] and a.query_positions["XY"].tolist() == [0, 0, 2]
    assert batch.num_examples == 5


def test_training_batches_cover_every_row_once_and_are_seeded():
    lengths = np.random.default_rng(0).integers(1, 50, size=1000)
    first = training_batches(1000, lengths, 64, np.random.default_rng(5))
    assert sorted(np.concatenate(first).tolist()) == list(range(1000))
    again = training_batches(1000, lengths, 64, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_evaluation_batches_hold_one_target_domain():
    arrays = SequenceArrays(
        inputs=np.array([[0, -1], [3, 1], [2, 4]]), targets=np.array([[4, -1], [-1, 0], [-1, 5]]), lengths=np.array([1, 2, 2])
    )
    batches = list(evaluation_batches(arrays, DOMAINS, 10))
    assert [(d, rows.tolist()) for d, rows in batches] == [(0, [1]), (1, [0, 2])]
    assert make_batch(arrays, batches[1][1], DOMAINS, ("XY",)).target_domain == 1


def _embedding_table(path, rows, dim):
    ids = [r[0] for r in rows]
    vectors = pa.array([r[1] for r in rows], pa.list_(pa.float32(), dim))
    present = [r[1] is not None for r in rows]
    write_parquet_atomic(pa.table({"item_id": ids, "embedding": vectors, "present": present}, schema=schema.embeddings_schema(dim)), path)


def test_item_features_keep_absent_items_as_zero_rows(tmp_path):
    _embedding_table(tmp_path / "tex.parquet", [(0, [1.0, 2.0]), (2, None), (5, [3.0, 4.0])], 2)
    tags = pl.DataFrame({"item_id": [0, 0, 6], "tag_id": [1, 0, 1], "weight": [0.25, 0.75, 1.0]})
    write_parquet_atomic(tags.to_arrow().cast(schema.ITEM_TAG_MATRIX), tmp_path / "tags.parquet")
    features = load_item_features(
        FeatureInputs(tex=tmp_path / "tex.parquet", tags=tmp_path / "tags.parquet"), 7, {"id", "img", "tex", "tag"}
    )
    tex = features.dense["tex"]
    assert tex.present.tolist() == [True, False, False, False, False, True, False]
    assert tex.matrix[5].tolist() == [3.0, 4.0] and tex.matrix[2].tolist() == [0.0, 0.0]
    assert features.tags.offsets.tolist() == [0, 2, 2, 2, 2, 2, 2, 3]
    assert features.tags.tag_ids.tolist() == [0, 1, 1] and features.tags.weights.tolist() == [0.75, 0.25, 1.0]
    assert features.available() == {"id", "tex", "tag"}
    assert any(note.startswith("img: no feature table") for note in features.notes)
    assert any(note.startswith("tex: 2 of 7 items present") for note in features.notes)


def test_a_present_row_without_a_vector_is_an_error(tmp_path):
    table = pa.table(
        {"item_id": [0], "embedding": pa.array([None], pa.list_(pa.float32(), 2)), "present": [True]},
        schema=schema.embeddings_schema(2),
    )
    write_parquet_atomic(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="present but have no"):
        load_item_features(FeatureInputs(tex=tmp_path / "bad.parquet"), 3, {"tex"})
