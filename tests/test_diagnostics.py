"""The diagnostics of what a run ranks by: the features alone, with no training."""

import numpy as np
import pytest
import torch

from cdsr_pipeline.model.data import DenseFeature, Domains, ItemFeatures, SequenceArrays, TagFeature
from cdsr_pipeline.model.diagnostics import content_similarity, random_mrr

# items 0-2 in Alpha, 3-6 in Beta
DOMAINS = Domains("toy", ("Alpha", "Beta"), (3, 4))
TEXT = torch.tensor([[1, 0], [0, 1], [1, 1], [1, 0], [0, 1], [0.9, 0.1], [-1, 0]], dtype=torch.float32)


def test_the_features_alone_rank_by_the_cosine_to_the_history_and_break_ties_at_random():
    tags = TagFeature(  # only item 2 has a tag: no Beta item shares one with any history
        offsets=torch.tensor([0, 0, 0, 1, 1, 1, 1, 1]), tag_ids=torch.tensor([0]), weights=torch.tensor([0.5]), num_tags=1
    )
    features = ItemFeatures(dense={"tex": DenseFeature(TEXT, torch.ones(7, dtype=torch.bool))}, tags=tags)
    arrays = SequenceArrays(  # both rows target Beta: item 3, then item 6
        inputs=np.array([[0, -1], [1, 2]]),
        targets=np.array([[3, -1], [-1, 6]]),
        lengths=np.array([1, 2]),
    )
    rows = {row.feature: row for row in content_similarity(features, arrays, DOMAINS)}
    assert set(rows) == {"tex", "tag"} and all(row.domain == "B" and row.rows == 2 for row in rows.values())
    # row 0: history [1, 0], target [1, 0]: first (item 5, [0.9, 0.1], comes second);
    # row 1: history [0, 1] + [1, 1] normalised, target [-1, 0] has the lowest cosine of the four: rank 4
    assert rows["tex"].mrr == pytest.approx((1 + 1 / 4) / 2)
    # no Beta item has a tag: every score 0, the expected reciprocal rank of a random order
    assert rows["tag"].mrr == pytest.approx(random_mrr(4))
