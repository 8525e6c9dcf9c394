"""Encoders: spec rules, a tiny random open_clip through the real checkpoint path, bundled MiniLM."""

from __future__ import annotations

import csv
import json

import numpy as np
import torch
import pytest

from cdsr_pipeline.features.encoders import (
    BUNDLED_MINILM_NAME,
    DEFAULT_OPEN_CLIP_MODEL,
    DEFAULT_OPEN_CLIP_PRETRAINED,
    EncoderConfigError,
    EncoderSpec,
    bundled_minilm_dir,
    length_batches,
    load_image_encoder,
    load_text_encoder,
)
from cdsr_pipeline.storage import sha256_file
from features_support import FIXTURES, TINY_CLIP_MODEL, drawn_image, write_tiny_clip_checkpoint


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip") / "tiny-random-clip.pt")


@pytest.fixture(scope="module")
def tiny_spec(tiny_checkpoint):
    return EncoderSpec(model=TINY_CLIP_MODEL, pretrained=str(tiny_checkpoint), device="cpu", batch_size=4)


# -- forward passes of similar length -------------------------------------------
def test_length_batches_group_similar_lengths_within_the_padding_slack():
    lengths = np.array([5, 3, 3, 9, 4, 3, 20, 3])
    batches = length_batches(lengths, max_rows=3)
    # shortest first, every position once, at most three a pass
    assert np.array_equal(np.concatenate(batches), np.argsort(lengths, kind="stable"))
    assert [b.tolist() for b in batches] == [[1, 2, 5], [7], [4], [0], [3], [6]]
    for batch in batches:  # padding to the longest adds at most 10% to the pass's own tokens
        assert len(batch) * lengths[batch].max() <= 1.1 * lengths[batch].sum()
    assert [b.tolist() for b in length_batches(np.array([4, 4, 4, 4]), max_rows=8)] == [[0, 1, 2, 3]]
    assert length_batches(np.array([], dtype=np.int64), max_rows=4) == []


# -- spec rules (no weights loaded) ---------------------------------------------
def test_open_clip_defaults_are_vit_b32_laion():
    spec = EncoderSpec(device="cpu").resolved()
    assert (spec.backend, spec.model, spec.pretrained) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert (DEFAULT_OPEN_CLIP_MODEL, DEFAULT_OPEN_CLIP_PRETRAINED) == ("ViT-B-32", "laion2b_s34b_b79k")


def test_batch_size_defaults_to_64_and_keeps_a_configured_one():
    assert EncoderSpec(device="cpu").resolved().batch_size == 64
    assert EncoderSpec(device="cuda").resolved().batch_size == 64
    assert EncoderSpec(device="cpu", batch_size=8).resolved().batch_size == 8


def test_sentence_transformers_defaults_to_bundled_minilm():
    spec = EncoderSpec(backend="sentence_transformers", device="cpu").resolved()
    assert spec.model == str(bundled_minilm_dir()) and spec.pretrained is None
    assert (bundled_minilm_dir() / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (EncoderSpec(pretrained=""), "needs pretrained weights"),
        (EncoderSpec(model="hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"), "architecture name"),
        (EncoderSpec(backend="sentence_transformers", pretrained="x"), "open_clip only"),
        (EncoderSpec(backend="word2vec"), "unknown encoder backend"),  # type: ignore[arg-type]
        (EncoderSpec(batch_size=0), "batch_size"),
    ],
)
def test_bad_specs_are_refused(spec, message):
    with pytest.raises(EncoderConfigError, match=message):
        spec.resolved()


def test_open_clip_refuses_unknown_weights_and_models(tmp_path):
    with pytest.raises(EncoderConfigError, match="neither an existing checkpoint file nor a pretrained tag"):
        load_text_encoder(EncoderSpec(pretrained=str(tmp_path / "missing.pt"), device="cpu"))
    with pytest.raises(EncoderConfigError, match="unknown open_clip model"):
        load_text_encoder(EncoderSpec(model="ViT-Nope", pretrained="openai", device="cpu"))
    with pytest.raises(EncoderConfigError, match="has no image encoder"):
        load_image_encoder(EncoderSpec(backend="sentence_transformers", device="cpu"))
    with pytest.raises(EncoderConfigError, match="folder not found"):
        load_text_encoder(
            EncoderSpec(backend="sentence_transformers", model=str(tmp_path / "no"), device="cpu")
        )


# -- tiny random open_clip, loaded as a local checkpoint ------------------------
def test_tiny_clip_text_and_image_end_to_end(tiny_spec, tiny_checkpoint):
    text_encoder = load_text_encoder(tiny_spec)
    image_encoder = load_image_encoder(tiny_spec)

    texts = ["stainless steel chef knife", "ground coffee, 12 ounce", "tea bags", "infant formula", "x"]
    vectors = text_encoder.encode_texts(texts)
    assert vectors.shape == (5, 32) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one_by_one = np.concatenate([text_encoder.encode_texts([t], batch_size=1) for t in texts])
    np.testing.assert_allclose(vectors, one_by_one, atol=1e-5)

    images = [drawn_image(seed, size=(40 + seed * 13, 30 + seed * 7)) for seed in range(5)]
    images.append(drawn_image(9).convert("L"))  # greyscale goes through the same preprocessing
    image_vectors = image_encoder.encode_images(images)
    assert image_vectors.shape == (6, 32) and image_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(image_vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        image_vectors[:2], image_encoder.encode_images(images[:2], batch_size=1), atol=1e-5
    )
    assert len({tuple(np.round(v, 4)) for v in image_vectors}) == 6  # different pictures, different vectors

    # Identity: the checkpoint file's hash, never a pretrained tag.
    digest = sha256_file(tiny_checkpoint)
    assert text_encoder.identity == {
        "backend": "open_clip",
        "model": TINY_CLIP_MODEL,
        "modality": "text",
        "pretrained_tag": None,
        "weights_sha256": digest,
        "dim": 32,
        "max_tokens": 77,
    }
    assert image_encoder.identity["weights_sha256"] == digest
    assert image_encoder.identity["image_size"] == [32, 32]
    assert text_encoder.identity_hash != image_encoder.identity_hash
    shown = json.dumps([text_encoder.identity, image_encoder.identity]).lower()
    assert not any(word in shown for word in ("laion", "openai", 'pretrained_tag": "'))

    model = text_encoder.model
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_clip_text_runs_only_up_to_the_pooled_token_with_open_clips_result(tiny_spec):
    encoder = load_text_encoder(tiny_spec)
    assert encoder.trims_padding
    texts = ["tea", "stainless steel chef knife with a long handle " * 3, "coffee", "knife " * 120, "a b c d"]
    tokens = encoder.tokenizer(texts)
    with torch.inference_mode():
        reference = encoder.model.encode_text(tokens, normalize=True).numpy()
    for batch_size in (1, 2, 5):
        np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=batch_size), reference, atol=1e-5)


def test_clip_truncates_at_77_tokens(tiny_spec):
    encoder = load_text_encoder(tiny_spec)
    long_a = "knife " * 120
    long_b = "knife " * 120 + "spoon fork ladle"  # differs only after the 77-token context
    short = "knife " * 20
    a, b, c = encoder.encode_texts([long_a, long_b, short])
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c, atol=1e-3)


def test_another_checkpoint_is_another_identity(tiny_spec, tmp_path):
    other = write_tiny_clip_checkpoint(tmp_path / "other.pt", seed=1)
    first = load_text_encoder(tiny_spec)
    second = load_text_encoder(EncoderSpec(model=TINY_CLIP_MODEL, pretrained=str(other), device="cpu"))
    assert first.identity_hash != second.identity_hash


# -- MiniLM on real product titles ----------------------------------------------
def read_titles() -> list[dict[str, str]]:
    with (FIXTURES / "food_kitchen_titles.tsv").open(encoding="utf-8") as handle:
        lines = [line for line in handle if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


@pytest.mark.slow
def test_minilm_puts_similar_products_closer():
    encoder = load_text_encoder(EncoderSpec(backend="sentence_transformers", device="cpu"))
    assert encoder.identity["model"] == BUNDLED_MINILM_NAME
    assert encoder.identity["dim"] == 384 and encoder.identity["max_tokens"] == 256
    assert len(encoder.identity["weights_sha256"]) == 64

    rows = read_titles()
    groups = np.array([row["group"] for row in rows])
    vectors = encoder.encode_texts([row["title"] for row in rows], batch_size=8)
    assert vectors.shape == (8, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    # Every title's nearest neighbour is the other product of its kind (coffee, formula, tea, knife).
    assert (groups[nearest] == groups).all(), similarity.round(2)
    same = groups[:, None] == groups[None, :]
    np.fill_diagonal(same, False)
    different = groups[:, None] != groups[None, :]
    assert similarity[same].mean() > similarity[different].mean() + 0.2


@pytest.mark.slow
def test_minilm_passes_grouped_by_token_count_give_sentence_transformers_vectors():
    encoder = load_text_encoder(EncoderSpec(backend="sentence_transformers", device="cpu"))
    titles = [row["title"] for row in read_titles()]
    # varied lengths, an empty text, and one past MiniLM's 256-token limit (truncated)
    texts = titles + [" ".join(titles), "", "tea " * 400, titles[0] + " " + titles[1]]
    expected = encoder.model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    for batch_size in (1, 3, 64):
        np.testing.assert_allclose(encoder.encode_texts(texts, batch_size=batch_size), expected, atol=1e-5)


@pytest.mark.slow
def test_minilm_in_bf16_keeps_each_real_titles_vector(monkeypatch):
    from cdsr_pipeline import hardware

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)  # emulated where the CPU lacks it: same numbers
    fp32 = load_text_encoder(EncoderSpec(backend="sentence_transformers", device="cpu"))
    bf16 = load_text_encoder(EncoderSpec(backend="sentence_transformers", device="cpu", precision="bf16"))
    assert bf16.identity == {**fp32.identity, "precision": "bf16"} and bf16.identity_hash != fp32.identity_hash
    titles = [row["title"] for row in read_titles()]
    a, b = fp32.encode_texts(titles), bf16.encode_texts(titles)
    assert b.dtype == np.float32
    cosines = (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosines.min() >= 0.999, cosines


def test_bf16_encoder_is_refused_where_the_cpu_has_no_native_bf16(monkeypatch):
    from cdsr_pipeline import hardware

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(EncoderConfigError, match="no native bf16"):
        EncoderSpec(backend="sentence_transformers", device="cpu", precision="bf16").resolved()
    with pytest.raises(EncoderConfigError, match="precision must be fp32 or bf16"):
        EncoderSpec(backend="sentence_transformers", device="cpu", precision="fp16").resolved()
