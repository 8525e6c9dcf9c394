"""The artifact contract: a stage opens another stage's files only through the typed
readers of ``assets/artifacts.py`` and only for its declared dependencies; a file that
lacks a column of its contract is refused with the file's name."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.assets._stage import DeclaredInputs, UndeclaredInputError
from cdsr_pipeline.assets.artifacts import (
    ArtifactContractError,
    read_items,
    read_tag_scores,
    tag_matrix_path,
)
from cdsr_pipeline.data.schema import ITEM_TAG_SCORES
from cdsr_pipeline.storage import ArtifactStore


def test_a_reader_opens_only_declared_dependencies(tmp_path):
    inputs = DeclaredInputs(ArtifactStore(tmp_path), ["cdsr_sequences", "item_tag_scores"], "item_tag_matrix")
    scores = pa.table({"item_id": [0], "tag_id": [1], "score": [90]}, schema=ITEM_TAG_SCORES)
    path = inputs.path("item_tag_scores", "scores.parquet")
    path.parent.mkdir(parents=True)
    pq.write_table(scores, path)
    assert read_tag_scores(inputs).equals(scores)
    with pytest.raises(UndeclaredInputError, match="item_tag_matrix reads 'item_tag_matrix'"):
        tag_matrix_path(inputs, "default")


def test_a_file_without_a_contract_column_is_refused_by_name(tmp_path):
    inputs = DeclaredInputs(ArtifactStore(tmp_path), ["cdsr_sequences"], "item_text_embeddings")
    path = inputs.path("cdsr_sequences", "items.parquet")
    path.parent.mkdir(parents=True)
    pq.write_table(pa.table({"item_id": [0], "title": ["tea"]}), path)
    with pytest.raises(ArtifactContractError, match=r"items\.parquet: no column\(s\) domain, domain_name, source_id"):
        read_items(inputs)
