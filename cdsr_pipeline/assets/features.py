"""Stage 2: frozen item features (text and image embeddings) as parquet keyed by item id."""

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..features.embeddings import absent_embeddings, embedding_table_problems, encode_item_images, encode_item_texts
from ..features.encoders import load_image_encoder, load_text_encoder
from ..features.images import ImageFetchConfig, ImageFetcher
from ..resources import ImageEncoderResource, StorageResource, TextEncoderResource
from ..storage import write_parquet_atomic
from ._config import dagster_config, dagster_fields
from ._stage import HEAVY_TAG, DeclaredInputs, run_stage
from .artifacts import EMBEDDINGS_FILE, ISSUES_FILE, ITEMS_OUT, read_items



@dg.asset(
    op_tags={HEAVY_TAG: "encoder"},
    deps=["cdsr_sequences"],
    group_name="features",
    code_version="1",
    kinds={"pytorch", "parquet"},
    description="E_tex: frozen text embedding of each item's title (+ description); present=false where an item has no text.",
)
def item_text_embeddings(
    context: dg.AssetExecutionContext, storage: StorageResource, text_encoder: TextEncoderResource
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)

    def build(folder):
        items = read_items(inputs)
        encoder = load_text_encoder(text_encoder.spec())
        table, stats = encode_item_texts(items, encoder, store.cache_dir("features"))
        write_parquet_atomic(table, folder / EMBEDDINGS_FILE)
        return stats.as_metadata()

    return run_stage(context, store, build=build, extra_inputs={"text_encoder": text_encoder.fingerprint(store)})


IMAGE_FETCH_SETTINGS = ("max_bytes", "max_pixels", "timeout_s", "retries", "concurrency", "retry_rejected")
"""The ``ImageFetchConfig`` fields a run may set (backoff, local root and user agent keep the library's defaults)."""
ImageFetchSettings = dagster_config(
    ImageFetchConfig,
    "ImageFetchSettings",
    "Limits for fetching item images (URLs are cached by content; see features/images.py).",
    fields=dagster_fields(ImageFetchConfig, include=IMAGE_FETCH_SETTINGS),
)


@dg.asset(
    op_tags={HEAVY_TAG: "encoder"},
    deps=["cdsr_sequences"],
    group_name="features",
    code_version="1",
    kinds={"pytorch", "parquet"},
    description="E_img: frozen CLIP image embedding of each item's image; present=false where an item has no usable image.",
)
def item_image_embeddings(
    context: dg.AssetExecutionContext,
    config: ImageFetchSettings,
    storage: StorageResource,
    image_encoder: ImageEncoderResource,
) -> dg.MaterializeResult:
    store = storage.store()
    inputs = DeclaredInputs.of(context, store)
    previous = store.read_manifest("item_image_embeddings")
    extra = {"image_encoder": image_encoder.fingerprint(store)}
    # Network failures are worth another try on the next run even when nothing else changed.
    if previous and previous.metadata.get("failed_fetches"):
        extra["retry_failed_fetches_after"] = previous.created_at

    def build(folder):
        items = read_items(inputs)
        refs = pc.utf8_trim_whitespace(pc.fill_null(items["image_ref"], ""))
        if not pc.any(pc.not_equal(refs, "")).as_py():
            # Nothing to encode: don't load (or download) an image model for it.
            context.log.info("no item has an image reference: image features are absent for this dataset")
            write_parquet_atomic(absent_embeddings(items["item_id"].to_pylist()), folder / EMBEDDINGS_FILE)
            return {
                "rows": items.num_rows,
                "present": 0,
                "coverage": 0.0,
                "missing": {"no_image_ref": items.num_rows},
                "failed_fetches": 0,
                "note": "no image references in this dataset: image features absent",
            }
        encoder = load_image_encoder(image_encoder.spec())
        with ImageFetcher(store.cache_dir("features"), ImageFetchConfig(**config.model_dump())) as fetcher:
            table, stats = encode_item_images(items, encoder, fetcher, store.cache_dir("features"))
        write_parquet_atomic(table, folder / EMBEDDINGS_FILE)
        write_parquet_atomic(stats.issues, folder / ISSUES_FILE)
        failed = sum(count for reason, count in stats.missing.items() if reason.startswith("failed:"))
        return stats.as_metadata() | {"failed_fetches": failed}

    return run_stage(context, store, build=build, config=config.model_dump(), extra_inputs=extra)


def embeddings_check(store, asset: str) -> dg.AssetCheckResult:
    """One row per item, in id order; a vector exactly where present; unit-norm vectors."""
    table = pq.read_table(store.path(asset, EMBEDDINGS_FILE))
    n_items = pq.read_metadata(store.path("cdsr_sequences", ITEMS_OUT)).num_rows
    problems = embedding_table_problems(table, n_items)
    present = table["present"].to_numpy(zero_copy_only=False)
    return dg.AssetCheckResult(
        passed=not problems,
        metadata={"rows": table.num_rows, "present": int(present.sum()), "coverage": float(present.mean()) if len(present) else 0.0,
                  "problems": dg.MetadataValue.json(problems)},
    )


@dg.asset_check(asset=item_text_embeddings, description="Aligned with item ids; vectors exactly where present; unit norm.")
def text_embeddings_aligned(storage: StorageResource) -> dg.AssetCheckResult:
    return embeddings_check(storage.store(), "item_text_embeddings")


@dg.asset_check(asset=item_image_embeddings, description="Aligned with item ids; vectors exactly where present; unit norm.")
def image_embeddings_aligned(storage: StorageResource) -> dg.AssetCheckResult:
    return embeddings_check(storage.store(), "item_image_embeddings")
