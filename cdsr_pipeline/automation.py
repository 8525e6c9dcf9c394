"""Reruns when data changes: a sensor on the raw source, and an optional nightly schedule.

Both launch the full pipeline job; stages whose inputs are unchanged reuse their
artifacts (see ``assets/_stage.py``), so a rerun costs only what changed. The sensor
is cheap: file hashes are cached by size and modification time.
"""

from __future__ import annotations

import dagster as dg

from .assets._stage import HEAVY_KINDS, HEAVY_TAG
from .assets.llm import SHARDS
from .assets.training import OPTIONAL_TRAINING_ASSETS
from .data.sources import source_files
from .llm.shards import SHARDED_STAGES
from .resources import DatasetSource, StorageResource
from .storage import stable_hash

SHARDED_ASSETS = SHARDED_STAGES if SHARDS > 1 else ()
"""The partitioned assets of this process's definitions (``CDSR_LLM_SHARDS`` above 1)."""

full_pipeline = dg.define_asset_job(
    "cdsr_full_pipeline",
    selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*OPTIONAL_TRAINING_ASSETS, *SHARDED_ASSETS),
    description="Every stage, from the raw source to the evaluation report, and the default models (not the "
    "ablation tables nor the fused TEMA-LLM: select those by name). Unchanged stages reuse their artifacts."
    + (
        f" The LLM stages' {SHARDS} item shards are not in it: they run in cdsr_llm_shards (one run per shard)."
        if SHARDED_ASSETS
        else ""
    ),
)

llm_shards = (
    dg.define_asset_job(
        "cdsr_llm_shards",
        selection=dg.AssetSelection.assets(*SHARDED_ASSETS),
        description=f"The per-item LLM stages, one run per item shard ({SHARDS} shards, CDSR_LLM_SHARDS): a "
        "backfill over its partitions runs the shards side by side (as many as the run queue allows), each with "
        "its own call log; cdsr_full_pipeline then reads every shard.",
    )
    if SHARDED_ASSETS
    else None
)


@dg.configured(dg.multiprocess_executor, config_schema={"max_concurrent": dg.Field(int, default_value=2)})
def _side_by_side(config: dict) -> dict:
    return {
        "max_concurrent": config["max_concurrent"],
        "tag_concurrency_limits": [{"key": HEAVY_TAG, "value": kind, "limit": 1} for kind in HEAVY_KINDS],
    }


parallel_pipeline = dg.define_asset_job(
    "cdsr_parallel_pipeline",
    selection=full_pipeline.selection,
    executor_def=_side_by_side,
    description="The full pipeline with independent stages side by side (each in its own process): e.g. the "
    "text and image embeddings and SASRec while the LLM stages run; at most one LLM, one encoder and one "
    "training stage at a time (op tag cdsr/heavy), max_concurrent (default 2) steps in all. The artifacts are "
    "the same as the in-process job's.",
)


def source_fingerprint(source: DatasetSource, storage: StorageResource) -> str:
    spec = source.spec()
    hashes = storage.store().file_hashes
    return stable_hash({"spec": spec.as_dict(), "files": {str(p): hashes.file_hash(p) for p in source_files(spec)}})


@dg.sensor(
    job=full_pipeline,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Runs the pipeline when the raw source's files change (content hash).",
)
def raw_source_changed(context: dg.SensorEvaluationContext, source: DatasetSource, storage: StorageResource):
    fingerprint = source_fingerprint(source, storage)
    if fingerprint == context.cursor:
        return dg.SkipReason(f"source unchanged ({fingerprint[:12]})")
    context.update_cursor(fingerprint)
    return dg.RunRequest(run_key=fingerprint, tags={"cdsr/source_fingerprint": fingerprint[:16]})


nightly_rerun = dg.ScheduleDefinition(
    name="nightly_rerun",
    job=full_pipeline,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Reruns the pipeline every night; unchanged stages are reused, so an idle night costs seconds.",
)
