"""Embedding tables: schema, presence mask, the incremental cache, images fetched over HTTP."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from cdsr_pipeline.data.schema import ITEMS, embeddings_schema
from cdsr_pipeline.features.embeddings import (
    FEATURE_ISSUES,
    EmbeddingCache,
    encode_item_images,
    encode_item_texts,
    encode_texts_by_item,
    item_text,
)
from cdsr_pipeline.features.encoders import EncoderSpec, load_image_encoder, load_text_encoder
from cdsr_pipeline.features.images import ImageFetchConfig, ImageFetcher
from features_support import (
    TINY_CLIP_MODEL,
    ImageServer,
    drawn_image,
    image_bytes,
    serve,
    write_tiny_clip_checkpoint,
)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory):
    checkpoint = write_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip") / "tiny-random-clip.pt")
    return EncoderSpec(model=TINY_CLIP_MODEL, pretrained=str(checkpoint), device="cpu", batch_size=3)


@pytest.fixture(scope="module")
def text_encoder(tiny_spec):
    return load_text_encoder(tiny_spec)


@pytest.fixture(scope="module")
def image_encoder(tiny_spec):
    return load_image_encoder(tiny_spec)


def items_table(rows: list[dict]) -> pa.Table:
    base = {
        "domain": "A",
        "domain_name": "Food",
        "source_id": "x",
        "title": None,
        "description": None,
        "image_ref": None,
    }
    return pa.Table.from_pylist([{**base, **row} for row in rows], schema=ITEMS)


ITEMS_ROWS = [
    {"item_id": 3, "title": "Henckels paring knife set", "description": "Three stainless blades"},
    {"item_id": 0, "title": "Lavazza ground coffee"},
    {"item_id": 1, "title": "   ", "description": None},  # nothing to encode
    {"item_id": 2, "title": None, "description": "Twinings afternoon tea bags"},
    {"item_id": 4, "title": "Lavazza ground coffee"},  # same text as item 0
    {"item_id": 5, "title": "Enfamil infant formula!", "description": "With iron"},
]


def test_item_text():
    assert item_text("Knife set", "Three blades") == "Knife set. Three blades"
    assert item_text("Best knife!", " sharp ") == "Best knife! sharp"
    assert item_text(None, "Only a description") == "Only a description"
    assert item_text(" ", None) is None


def test_text_table_schema_order_mask_and_values(text_encoder, tmp_path):
    table, stats = encode_item_texts(items_table(ITEMS_ROWS), text_encoder, tmp_path, progress=False)

    assert table.schema == embeddings_schema(32)
    assert table["item_id"].to_pylist() == [0, 1, 2, 3, 4, 5]
    assert table["present"].to_pylist() == [True, False, True, True, True, True]
    assert table["embedding"][1].as_py() is None  # no fake vector
    expected = text_encoder.encode_texts(
        [
            "Lavazza ground coffee",
            "Twinings afternoon tea bags",
            "Henckels paring knife set. Three stainless blades",
        ]
    )
    got = np.array(
        table["embedding"].to_pylist()[0:1] + table["embedding"].to_pylist()[2:4], dtype=np.float32
    )
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert table["embedding"][0].as_py() == table["embedding"][4].as_py()

    assert (stats.rows, stats.present, stats.encoded_items, stats.cached_items) == (6, 5, 5, 0)
    assert stats.encoded_contents == 4  # items 0 and 4 share one text
    assert stats.missing == {"no_text": 1}
    assert stats.coverage == pytest.approx(5 / 6)
    metadata = stats.as_metadata()
    assert metadata["encoder"]["weights_sha256"] == text_encoder.identity["weights_sha256"]
    assert metadata["encoder_hash"] == text_encoder.identity_hash and metadata["issues"] == 0


def test_rerun_encodes_nothing_and_a_changed_title_only_that_item(text_encoder, tmp_path):
    items = items_table(ITEMS_ROWS)
    first, _ = encode_item_texts(items, text_encoder, tmp_path, progress=False)

    again, stats = encode_item_texts(items, text_encoder, tmp_path, progress=False)
    assert (stats.encoded_contents, stats.encoded_items, stats.cached_items) == (0, 0, 5)
    assert again.equals(first)

    changed_rows = [dict(row) for row in ITEMS_ROWS]
    changed_rows[0]["title"] = "Henckels paring knife set, black"
    changed, stats = encode_item_texts(items_table(changed_rows), text_encoder, tmp_path, progress=False)
    assert (stats.encoded_contents, stats.encoded_items, stats.cached_items) == (1, 1, 4)
    changed_ids = [i for i in range(6) if changed["embedding"][i].as_py() != first["embedding"][i].as_py()]
    assert changed_ids == [3]


def test_another_encoder_encodes_everything(text_encoder, tmp_path):
    items = items_table(ITEMS_ROWS)
    encode_item_texts(items, text_encoder, tmp_path, progress=False)
    other_checkpoint = write_tiny_clip_checkpoint(tmp_path / "other.pt", seed=7)
    other = load_text_encoder(
        EncoderSpec(model=TINY_CLIP_MODEL, pretrained=str(other_checkpoint), device="cpu")
    )

    _, stats = encode_item_texts(items, other, tmp_path, progress=False)
    assert (stats.encoded_contents, stats.encoded_items, stats.cached_items) == (4, 5, 0)
    assert len(list((tmp_path / "embeddings").iterdir())) == 2  # one cache folder per encoder


def test_cache_parts_are_written_per_chunk_so_a_stopped_run_resumes(text_encoder, tmp_path):
    texts = [f"product number {i}" for i in range(7)]
    # A run that stopped after the first four items (what a crash leaves behind)...
    encode_texts_by_item(
        range(4), texts[:4], text_encoder, tmp_path, batch_size=1, chunk_size=2, progress=False
    )
    cache = EmbeddingCache(tmp_path, text_encoder.identity)
    assert len(cache.parts()) == 2
    # ...is picked up where it stopped.
    table, stats = encode_texts_by_item(
        range(7),
        texts,
        text_encoder,
        tmp_path,
        feature="llm_text",
        batch_size=1,
        chunk_size=2,
        progress=False,
    )
    assert (stats.feature, stats.encoded_contents, stats.cached_items) == ("llm_text", 3, 4)
    assert len(cache.parts()) == 4  # 2 + 1 new vectors: one part per full chunk, one for the rest

    cache.compact(max_parts=1)
    assert len(cache.parts()) == 1
    rerun, stats = encode_texts_by_item(range(7), texts, text_encoder, tmp_path, progress=False)
    assert stats.encoded_contents == 0 and rerun.equals(table)


def test_cache_lookup_tolerates_duplicates_and_unknowns(tmp_path):
    identity = {"backend": "test", "model": "none", "dim": 2}
    cache = EmbeddingCache(tmp_path, identity)
    cache.write(["a", "b"], np.array([[1, 0], [0, 1]], dtype=np.float32))
    cache.write(["a"], np.array([[1, 0]], dtype=np.float32))  # left by an interrupted compaction
    vectors = cache.lookup(pa.array(["b", None, "zz", "a"], pa.string()))
    assert vectors.to_pylist() == [[0.0, 1.0], None, None, [1.0, 0.0]]
    assert cache.known() == {"a", "b"}


def test_bad_inputs_are_refused(text_encoder, tmp_path):
    with pytest.raises(ValueError, match="duplicate item_id"):
        encode_texts_by_item([1, 1], ["a", "b"], text_encoder, tmp_path, progress=False)
    with pytest.raises(ValueError, match="2 item ids but 1 texts"):
        encode_texts_by_item([1, 2], ["a"], text_encoder, tmp_path, progress=False)
    with pytest.raises(ValueError, match="lacks column"):
        encode_item_texts(pa.table({"item_id": [1]}), text_encoder, tmp_path, progress=False)


def test_images_from_files_and_urls(image_encoder, tmp_path):
    red, blue = drawn_image(0), drawn_image(2)
    local = tmp_path / "local.jpg"
    local.write_bytes(image_bytes(blue, "JPEG"))
    server = ImageServer(
        {
            "/red.png": serve(image_bytes(red, "PNG"), "image/png"),
            "/moved.png": serve(b"<html>moved</html>", "text/html"),
        }
    )
    items = items_table(
        [
            {"item_id": 0, "image_ref": server.url("/red.png")},
            {"item_id": 1, "image_ref": str(local)},
            {"item_id": 2, "image_ref": None},
            {"item_id": 3, "image_ref": server.url("/moved.png")},
            {"item_id": 4, "image_ref": server.url("/not-there.png")},
            {"item_id": 5, "image_ref": server.url("/red.png")},  # the same picture as item 0
        ]
    )
    config = ImageFetchConfig(timeout_s=2.0, retries=0)
    with server.running():
        with ImageFetcher(tmp_path / "cache", config) as fetcher:
            table, stats = encode_item_images(
                items, image_encoder, fetcher, tmp_path / "cache", progress=False
            )
        hits_after_first_run = sum(server.hits.values())
        with ImageFetcher(tmp_path / "cache", config) as fetcher:
            again, rerun_stats = encode_item_images(
                items, image_encoder, fetcher, tmp_path / "cache", progress=False
            )
        hits_after_rerun = sum(server.hits.values())

    assert table.schema == embeddings_schema(32)
    assert table["present"].to_pylist() == [True, True, False, False, False, True]
    expected = image_encoder.encode_images([red, image_bytes_roundtrip(blue)])
    got = np.array([table["embedding"][0].as_py(), table["embedding"][1].as_py()], dtype=np.float32)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert stats.missing == {"no_image_ref": 1, "rejected:not_an_image": 1, "rejected:http_404": 1}
    assert (stats.encoded_contents, stats.encoded_items) == (2, 3)
    assert stats.issues.schema == FEATURE_ISSUES
    assert stats.issues.select(["item_id", "status", "reason"]).to_pylist() == [
        {"item_id": 3, "status": "rejected", "reason": "not_an_image"},
        {"item_id": 4, "status": "rejected", "reason": "http_404"},
    ]
    assert stats.encoder["modality"] == "image"

    assert hits_after_rerun == hits_after_first_run  # settled refs are not fetched again
    assert (rerun_stats.encoded_contents, rerun_stats.cached_items) == (0, 3)
    assert again.equals(table)


def image_bytes_roundtrip(image: Image.Image) -> Image.Image:
    """The picture as the encoder sees it after a JPEG save and load."""
    return Image.open(io.BytesIO(image_bytes(image, "JPEG"))).convert("RGB")


def test_cached_text_encoder_gives_the_encoders_vectors_and_encodes_each_text_once(text_encoder, tmp_path):
    from cdsr_pipeline.features.embeddings import CachedTextEncoder

    class Counting:
        def __init__(self, inner):
            self.inner, self.seen = inner, []
            self.identity, self.dim, self.batch_size = inner.identity, inner.dim, inner.batch_size
            self.identity_hash = inner.identity_hash

        def encode_texts(self, texts, batch_size=None):
            self.seen += list(texts)
            return self.inner.encode_texts(texts, batch_size=batch_size)

    texts = ["green tea", "cast iron pan", "olive oil", "green tea"]
    direct = text_encoder.encode_texts(texts)
    counting = Counting(text_encoder)
    cached = CachedTextEncoder(counting, tmp_path)
    assert np.array_equal(cached.encode_texts(texts), direct)  # first call: the encoder's own output
    assert np.array_equal(cached.encode_texts(texts[::-1]), direct[::-1])  # served from the cache
    mixed = cached.encode_texts(["olive oil", "wooden spoon"])
    assert counting.seen == texts + ["wooden spoon"]
    np.testing.assert_allclose(mixed[1], text_encoder.encode_texts(["wooden spoon"])[0], rtol=1e-6, atol=1e-6)
