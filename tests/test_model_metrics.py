"""Ranking metrics against hand-computed ranks; the sampled-negative protocol."""

import math

import numpy as np
import pytest
import torch

from cdsr_pipeline.model.data import Domains
from cdsr_pipeline.model.evaluate import negatives_digest, sample_negatives
from cdsr_pipeline.model.metrics import hit_at, mrr, ndcg_at, paired_mrr_difference, summarize, target_ranks


def test_rank_counts_only_strictly_higher_candidates():
    target = torch.tensor([0.5, 0.9, 0.1])
    candidates = torch.tensor(
        [
            [0.6, 0.5, 0.4, 0.7],  # two higher, one tie -> rank 3
            [0.1, 0.2, 0.3, 0.4],  # none higher -> rank 1
            [0.2, 0.3, 0.4, 0.5],  # all higher -> rank 5
        ]
    )
    assert target_ranks(target, candidates).tolist() == [3, 1, 5]


def test_rank_ignores_the_target_itself_in_a_full_row():
    scores = torch.tensor([[0.1, 0.8, 0.3, 0.8]])
    target = scores[:, 1]
    assert target_ranks(target, scores).tolist() == [1]  # the tie with item 3 favours the target


def test_metrics_match_hand_computation():
    ranks = np.array([1, 2, 5, 11])
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 11) / 4)
    assert ndcg_at(ranks, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert ndcg_at(ranks, 10) == pytest.approx(ndcg_at(ranks, 5))
    assert hit_at(ranks, 10) == pytest.approx(3 / 4)
    assert summarize(ranks) == {
        "mrr": pytest.approx(mrr(ranks)),
        "ndcg_5": pytest.approx(ndcg_at(ranks, 5)),
        "ndcg_10": pytest.approx(ndcg_at(ranks, 10)),
        "hr_10": pytest.approx(0.75),
    }


def test_metrics_of_no_rows_are_nan():
    assert math.isnan(mrr(np.array([])))


DOMAINS = Domains("toy", ("A", "B"), (5, 7))


def test_negatives_stay_in_the_target_domain_and_exclude_only_the_target():
    targets = np.array([0, 4, 5, 11, 8] * 40)
    negatives = sample_negatives(targets, DOMAINS, 999, seed=3, split="test")
    local_targets = np.where(targets >= 5, targets - 5, targets)
    sizes = np.where(targets >= 5, 7, 5)
    assert negatives.shape == (200, 999)
    assert (negatives >= 0).all() and (negatives < sizes[:, None]).all()
    assert not (negatives == local_targets[:, None]).any()
    # with replacement: every other item of the domain appears, many times
    for row, size, target in zip(negatives[:5], sizes[:5], local_targets[:5]):
        assert set(row.tolist()) == set(range(size)) - {target}


def test_negatives_are_seeded_and_differ_between_splits():
    targets = np.array([1, 6, 9])
    first = sample_negatives(targets, DOMAINS, 50, seed=0, split="valid")
    assert np.array_equal(first, sample_negatives(targets, DOMAINS, 50, seed=0, split="valid"))
    assert not np.array_equal(first, sample_negatives(targets, DOMAINS, 50, seed=1, split="valid"))
    assert not np.array_equal(first, sample_negatives(targets, DOMAINS, 50, seed=0, split="test"))
    assert negatives_digest(first) == negatives_digest(first.copy())


@pytest.mark.parametrize("k", [1, 3, 7, 50, 60])
def test_top_k_indices_equal_a_stable_full_sort_with_ties_and_excluded_items(k):
    from cdsr_pipeline.model.recommend import top_k_indices

    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (50,), generator=generator).float()  # many ties
    scores[[4, 9, 30]] = -torch.inf  # excluded (seen) items
    assert top_k_indices(scores, k) == torch.argsort(scores, descending=True, stable=True)[:k].tolist()


@pytest.mark.parametrize("k", [1, 5, 12, 60])
def test_top_k_rows_equal_the_one_row_selection_with_ties_and_excluded_items(k):
    from cdsr_pipeline.model.recommend import top_k_indices, top_k_rows

    generator = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 6, (9, 50), generator=generator).float()  # many ties, across the k-th place too
    scores[1] = torch.arange(50).float()  # no ties at all
    scores[2, 5:] = -torch.inf  # fewer finite scores than k
    scores[3, [4, 9, 30]] = -torch.inf
    assert top_k_rows(scores, k) == [top_k_indices(row, k) for row in scores]
    assert top_k_rows(scores, k) == [torch.argsort(row, descending=True, stable=True)[:k].tolist() for row in scores]


def test_paired_difference_is_the_mrr_difference_with_an_interval_around_it():
    rng = np.random.default_rng(3)
    reference = rng.integers(1, 50, size=400)
    better = np.maximum(1, reference - rng.integers(0, 3, size=400))  # never worse, often better
    difference, low, high = paired_mrr_difference(better, reference)
    assert difference == pytest.approx(mrr(better) - mrr(reference))
    assert 0 < low < difference < high
    assert paired_mrr_difference(better, reference) == (difference, low, high)  # seeded
    same, same_low, same_high = paired_mrr_difference(reference, reference)
    assert same == same_low == same_high == 0.0
    # pairing: every row a little better is a sure gain, however noisy the rows are
    noisy = rng.integers(1, 1000, size=400)
    _, low, _ = paired_mrr_difference(noisy, noisy + 1)
    assert low > 0
    with pytest.raises(ValueError, match="equal non-empty"):
        paired_mrr_difference(reference, reference[:-1])
