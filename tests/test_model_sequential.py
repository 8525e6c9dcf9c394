"""The model family: loss/inference weighting, empty prefixes, fusion renormalisation,
the chunked softmax normaliser, presets."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from cdsr_pipeline.model import ABLATIONS, PRESETS, ModelConfig, TrainConfig, layers
from cdsr_pipeline.model.build import build_model
from cdsr_pipeline.model.config import config_to_dict, model_config_from_dict, train_config_from_dict
from cdsr_pipeline.model.data import DenseFeature, Domains, ItemFeatures, SequenceArrays, TagFeature, make_batch
from cdsr_pipeline.model.layers import chunked_logsumexp

DOMAINS = Domains("toy", ("Alpha", "Beta"), (5, 7))
N = DOMAINS.num_items


def _features(with_tags: bool = True) -> ItemFeatures:
    generator = torch.Generator().manual_seed(0)
    dense = {name: DenseFeature(torch.randn(N, 6, generator=generator), torch.ones(N, dtype=torch.bool)) for name in ("tex", "llm")}
    tags = None
    if with_tags:
        tags = TagFeature(
            offsets=torch.arange(N + 1),
            tag_ids=torch.arange(N) % 3,
            weights=torch.ones(N),
            num_tags=3,
        )
    return ItemFeatures(dense=dense, tags=tags)


def _model(config: ModelConfig, features: ItemFeatures | None = None):
    torch.manual_seed(0)
    model = build_model(
        dataclasses.replace(config, hidden_dim=16, dropout=0.0),
        DOMAINS,
        features or _features(),
        max_len=10,
        item_counts=np.zeros(N),
    )
    return model.eval()


# merged inputs 0 6 7 1 8 -> targets 6 7 1 8 2 (B B A B A); a second row starts in B
ARRAYS = SequenceArrays(
    inputs=np.array([[0, 6, 7, 1, 8], [9, 3, 10, -1, -1]]),
    targets=np.array([[6, 7, 1, 8, 2], [4, 11, 5, -1, -1]]),
    lengths=np.array([5, 3]),
)


def _reference_log_probs(model, name, outputs, batch, domain):
    """log P_m^s(i) of every item of the domain, [V, E, N_D], straight from the
    definition: encoders over every position, a log_softmax per query, uniform rows for
    empty prefixes."""
    tower, ex = model.towers[name], batch.domains[domain]
    queries = torch.cat([tower.queries(outputs[name][v][ex.query_rows[v], ex.query_positions[v]]) for v in model.views])
    log_probs = torch.log_softmax(queries @ tower.candidates(*model.domains.item_range(domain)).t(), dim=-1)
    rows = log_probs[ex.example_query.clamp(min=0)]
    return rows.masked_fill((ex.example_query < 0)[..., None], -math.log(model.domains.sizes[domain]))


def _manual_loss(model, batch):
    """-sum_s w_D(s) log sum_m alpha_m P_m^s(target), from full softmax rows, mean over examples."""
    outputs = model._encode(batch)
    total = 0.0
    for domain in (0, 1):
        ex = batch.domains[domain]
        per_tower = []
        for name in model.towers:
            full = _reference_log_probs(model, name, outputs, batch, domain)  # [V, E, N_D]
            per_tower.append(full.gather(2, ex.targets[None, :, None].expand(full.shape[0], -1, 1)).squeeze(2))
        probs = sum(torch.exp(lp + lw) for lp, lw in zip(per_tower, model.log_weights))
        total = total - (model.view_weights[domain][:, None] * probs.log()).sum()
    return total / batch.num_examples


@pytest.mark.parametrize("weighting", ["target_relative", "as_written"])
def test_loss_is_the_weighted_fused_negative_log_likelihood(weighting):
    model = _model(dataclasses.replace(PRESETS["tema_llm"], sequence_weighting=weighting))
    batch = make_batch(ARRAYS, np.array([0, 1]), DOMAINS, model.views)
    with torch.no_grad():
        assert model.calculate_loss(batch).item() == pytest.approx(_manual_loss(model, batch).item(), rel=1e-5)


def test_sequence_weights_follow_the_target_domain():
    relative = _model(PRESETS["llm_emf"]).view_weights
    written = _model(dataclasses.replace(PRESETS["llm_emf"], sequence_weighting="as_written")).view_weights
    # views (X, Y, X+Y); rows: target domain A, target domain B
    assert torch.allclose(relative, torch.tensor([[1.0, 0.3, 0.1], [0.3, 1.0, 0.1]]))
    assert torch.allclose(written, torch.tensor([[1.0, 0.3, 0.1], [1.0, 0.3, 0.1]]))
    assert _model(dataclasses.replace(PRESETS["llm_emf"], multi_attention=False)).view_weights.tolist() == [[1.0], [1.0]]


def test_inference_score_is_the_weighted_sum_of_fused_probabilities():
    model = _model(PRESETS["tema_llm"])
    rows = np.array([0])  # one evaluation row: history 0 6 7 1, target 8 (domain B)
    arrays = SequenceArrays(inputs=np.array([[0, 6, 7, 1]]), targets=np.array([[-1, -1, -1, 8]]), lengths=np.array([4]))
    batch = make_batch(arrays, rows, DOMAINS, model.views)
    with torch.no_grad():
        scores = model.full_sort_predict(batch)
        outputs = model._encode(batch)
        fused = sum(
            torch.exp(_reference_log_probs(model, name, outputs, batch, 1)) * w.exp()
            for name, w in zip(model.towers, model.log_weights)
        )  # [V, E, N_B]
        expected = fused[0] * 0.3 + fused[1] * 1.0 + fused[2] * 0.1  # X is the other domain for target B
    assert scores.shape == (1, 7)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert model.predict(batch, torch.tensor([[3, 0]]))[0].tolist() == pytest.approx([scores[0, 3].item(), scores[0, 0].item()])


def test_an_empty_prefix_predicts_the_uniform_distribution():
    model = _model(PRESETS["llm_emf"])
    # history 9 11 10 (all domain B) -> no X item: the X view is uniform over the target domain
    arrays = SequenceArrays(inputs=np.array([[9, 11, 10]]), targets=np.array([[-1, -1, 2]]), lengths=np.array([3]))
    batch = make_batch(arrays, np.array([0]), DOMAINS, model.views)
    outputs = model._encode(batch)
    with torch.no_grad():
        for name in model.towers:
            log_probs = _reference_log_probs(model, name, outputs, batch, 0)
            assert torch.allclose(log_probs[0], torch.full((1, 5), -math.log(5)))
            targets = model._domain_log_probs(name, outputs[name], batch, 0)
            assert targets[0].item() == pytest.approx(-math.log(5))


def test_absent_modalities_are_left_out_and_alpha_renormalised():
    features = _features()
    features.notes.append("img: no feature table for this dataset; modality left out")
    tema = _model(PRESETS["tema_llm"], features)
    assert tema.summary["towers"] == pytest.approx({"id": 0.5, "text": 0.25, "tag": 0.25})
    assert any(note.startswith("img:") for note in tema.notes)
    assert any("renormalised" in note for note in tema.notes)
    emf = _model(PRESETS["llm_emf"], _features(with_tags=False))
    assert emf.summary["towers"] == pytest.approx({"id": 2 / 3, "text": 1 / 3})
    assert torch.exp(emf.log_weights).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="none of the modalities"):
        _model(ModelConfig(modalities=("img",)))


def test_baselines_and_early_fusion_build_and_score():
    for config in (PRESETS["sasrec"], PRESETS["gru4rec"], PRESETS["tema_llm_fused"]):
        model = _model(config)
        batch = make_batch(ARRAYS, np.array([0, 1]), DOMAINS, model.views)
        assert torch.isfinite(model.calculate_loss(batch))
    assert _model(PRESETS["sasrec"]).summary == {
        "sources": ["id"],
        "towers": {"id": 1.0},
        "views": ["XY"],
        "view_weights": {"Alpha": {"XY": 1.0}, "Beta": {"XY": 1.0}},
        "scoring": "dot",
    }


@pytest.mark.parametrize("preset", ["sasrec", "llm_emf", "tema_llm", "tema_llm_fused"])
def test_fixed_weights_cache_the_candidates_without_changing_a_score(preset):
    model = _model(PRESETS[preset])
    # an evaluation batch: one target per row, the last, both in domain Alpha
    last_only = np.full_like(ARRAYS.targets, -1)
    last_only[0, 4], last_only[1, 2] = 2, 4
    arrays = SequenceArrays(ARRAYS.inputs, last_only, ARRAYS.lengths)
    batch = make_batch(arrays, np.array([0, 1]), DOMAINS, model.views)
    with torch.no_grad():
        plain = model.full_sort_predict(batch)
        with model.fixed_weights():
            first = model.full_sort_predict(batch)
            cached = dict(model._candidate_cache)
            second = model.full_sort_predict(batch)
        assert model._candidate_cache is None  # nothing outlives the block
    assert set(cached) == {(name, 0) for name in model.towers}
    torch.testing.assert_close(first, plain, rtol=0, atol=0)
    torch.testing.assert_close(second, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="no_grad"), model.fixed_weights():
        pass  # a cache built while gradients flow would go stale at the next step


def test_sampled_softmax_equals_the_full_one_when_it_samples_the_whole_domain():
    full = _model(PRESETS["tema_llm"])
    sampled = _model(dataclasses.replace(PRESETS["tema_llm"], loss_negatives=1000))
    few = _model(dataclasses.replace(PRESETS["tema_llm"], loss_negatives=2))
    batch = make_batch(ARRAYS, np.array([0, 1]), DOMAINS, full.views)
    with torch.no_grad():
        assert sampled.calculate_loss(batch).item() == pytest.approx(full.calculate_loss(batch).item())
        assert torch.isfinite(few.calculate_loss(batch))


@pytest.mark.parametrize("max_logit", [None, 10.0])
@pytest.mark.parametrize("path", ["stored", "chunked"])
def test_chunked_logsumexp_matches_autograd(monkeypatch, max_logit, path):
    if path == "chunked":  # logits over the storing budget: several chunks, recomputed in backward
        monkeypatch.setitem(layers.STORE_ELEMENTS, "cpu", 0)
        monkeypatch.setitem(layers.CHUNK_ELEMENTS, "cpu", 64)
    generator = torch.Generator().manual_seed(1)
    queries = (torch.nn.functional.normalize(torch.randn(150, 8, generator=generator, dtype=torch.float64), dim=1) * 10).requires_grad_()
    candidates = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator, dtype=torch.float64), dim=1).requires_grad_()
    upstream = torch.randn(150, generator=generator, dtype=torch.float64)
    ours = chunked_logsumexp(queries, candidates, max_logit)
    reference = torch.logsumexp(queries @ candidates.t(), dim=1)
    assert torch.allclose(ours, reference)
    grads = torch.autograd.grad((ours * upstream).sum(), (queries, candidates))
    expected = torch.autograd.grad((reference * upstream).sum(), (queries, candidates))
    assert all(torch.allclose(a, b) for a, b in zip(grads, expected))


@pytest.mark.parametrize("max_logit", [None, 10.0])
@pytest.mark.parametrize("path", ["stored", "chunked"])
def test_chunked_logsumexp_under_bf16_autocast_keeps_fp32_normalisers_and_gradients(monkeypatch, max_logit, path):
    if path == "chunked":
        monkeypatch.setitem(layers.STORE_ELEMENTS, "cpu", 0)
        monkeypatch.setitem(layers.CHUNK_ELEMENTS, "cpu", 512)
    generator = torch.Generator().manual_seed(2)
    queries = (torch.nn.functional.normalize(torch.randn(200, 32, generator=generator), dim=1) * 10).requires_grad_()
    candidates = torch.nn.functional.normalize(torch.randn(3000, 32, generator=generator), dim=1).requires_grad_()
    upstream = torch.rand(200, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_logsumexp(queries, candidates, max_logit)
    assert ours.dtype == torch.float32
    reference = torch.logsumexp(queries @ candidates.t(), dim=1)
    # bf16 logits (8-bit mantissa) around 10, an fp32 normaliser of about 16
    assert (ours - reference).abs().max().item() < 0.02
    grads = torch.autograd.grad((ours * upstream).sum(), (queries, candidates))
    expected = torch.autograd.grad((reference * upstream).sum(), (queries, candidates))
    for got, want in zip(grads, expected):
        assert got.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item() > 0.999


def test_stored_logsumexp_refuses_a_second_backward_instead_of_a_wrong_gradient():
    queries = torch.randn(5, 4, requires_grad=True)
    out = chunked_logsumexp(queries, torch.randn(7, 4), None).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        out.backward()


def test_configs_round_trip_through_json_and_presets_are_valid():
    config = TrainConfig(model=PRESETS["tema_llm"], name="t", ablation_group="g")
    assert train_config_from_dict(config_to_dict(config)) == config
    for group in ABLATIONS.values():
        for model in group.values():
            assert model_config_from_dict(config_to_dict(model)) == model
    assert config.identity_hash() == dataclasses.replace(config, epochs=7, name="other").identity_hash()
    assert config.identity_hash() != dataclasses.replace(config, seed=1).identity_hash()
    with pytest.raises(ValueError):
        ModelConfig(modalities=("id", "audio"))


@pytest.mark.parametrize("preset", ["sasrec", "gru4rec", "llm_emf", "tema_llm", "tema_llm_fused"])
def test_inference_equals_the_full_softmax_of_every_position(preset):
    """full_sort_predict computes the encoders' last block only where it is read, and
    folds normaliser, view and tower weights into one pass: the same scores as the
    definition. Row 1 has an empty X prefix; row 2 two examples that share their Y
    query (the Y prefix [6] before both targets: one query read twice)."""
    model = _model(PRESETS[preset])
    arrays = SequenceArrays(
        inputs=np.array([[0, 6, 7, 1, 8], [9, 11, 10, -1, -1], [0, 6, 1, -1, -1]]),
        targets=np.array([[-1, -1, -1, -1, 2], [-1, -1, 3, -1, -1], [-1, 1, 2, -1, -1]]),
        lengths=np.array([5, 3, 3]),
    )
    batch = make_batch(arrays, np.arange(3), DOMAINS, model.views)
    examples = batch.domains[0]
    assert (examples.example_query >= 0).sum() > sum(r.numel() for r in examples.query_rows.values()) or preset in ("sasrec", "gru4rec")
    with torch.no_grad():
        outputs = model._encode(batch)
        expected = sum(
            torch.einsum("v,ven->en", model.view_weights[0] * w.exp(), _reference_log_probs(model, name, outputs, batch, 0).exp())
            for name, w in zip(model.towers, model.log_weights)
        )
        scores = model.full_sort_predict(batch)
    assert scores.shape == (4, 5)
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("preset", ["sasrec", "gru4rec", "llm_emf", "tema_llm", "tema_llm_fused"])
def test_a_round_mixing_target_domains_scores_each_as_its_own_batch(preset):
    """A served round holds both target domains: one encoder pass per tower and view
    gives each domain's rows the scores of a batch of that domain alone; the
    single-domain contract (tower_scores, full_sort_predict) still refuses the mix."""
    model = _model(PRESETS[preset])
    arrays = SequenceArrays(  # last targets: Beta, Alpha, Beta, Alpha (row 2 has no X prefix)
        inputs=np.array([[0, 6, 7, 1, 8], [9, 11, 10, -1, -1], [6, 11, -1, -1, -1], [0, 1, -1, -1, -1]]),
        targets=np.array([[-1, -1, -1, -1, 9], [-1, -1, 3, -1, -1], [-1, 7, -1, -1, -1], [-1, 2, -1, -1, -1]]),
        lengths=np.array([5, 3, 2, 2]),
    )
    with torch.no_grad(), model.fixed_weights():
        mixed = model.tower_scores_by_domain(make_batch(arrays, np.arange(4), DOMAINS, model.views))
        for domain, rows in ((0, [1, 3]), (1, [0, 2])):
            alone = model.tower_scores(make_batch(arrays, np.array(rows), DOMAINS, model.views))
            assert set(mixed[domain]) == set(alone) == set(model.towers)
            for name in alone:
                torch.testing.assert_close(mixed[domain][name], alone[name], rtol=1e-5, atol=1e-7)
        with pytest.raises(ValueError, match="mixes target domains"):
            model.tower_scores(make_batch(arrays, np.arange(4), DOMAINS, model.views))


@pytest.mark.parametrize("preset", ["sasrec", "llm_emf", "tema_llm", "tema_llm_fused"])
def test_the_views_parts_sum_to_the_score_and_each_is_its_weighted_term(preset):
    """view_scores splits full_sort_predict by sequence: each view's part is every tower's
    alpha_m w_D(s) P_m^s (the uniform 1/N_D for an empty prefix), and the parts sum to it."""
    model = _model(PRESETS[preset])
    arrays = SequenceArrays(  # row 1's X prefix is empty
        inputs=np.array([[0, 6, 7, 1, 8], [9, 11, 10, -1, -1], [0, 6, 1, -1, -1]]),
        targets=np.array([[-1, -1, -1, -1, 2], [-1, -1, 3, -1, -1], [-1, 1, 2, -1, -1]]),
        lengths=np.array([5, 3, 3]),
    )
    batch = make_batch(arrays, np.arange(3), DOMAINS, model.views)
    with torch.no_grad():
        parts = model.view_scores(batch)
        outputs = model._encode(batch)
        log_probs = {name: _reference_log_probs(model, name, outputs, batch, 0).exp() for name in model.towers}
        scores = model.full_sort_predict(batch)
    assert list(parts) == list(model.views)
    torch.testing.assert_close(sum(parts.values()), scores, rtol=1e-5, atol=1e-7)
    for v, view in enumerate(model.views):
        expected = sum(model.view_weights[0][v] * w.exp() * log_probs[name][v] for name, w in zip(model.towers, model.log_weights))
        torch.testing.assert_close(parts[view], expected, rtol=1e-5, atol=1e-7)
