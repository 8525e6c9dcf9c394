"""The Dagster definitions of the pipeline: ``dagster dev -w workspace.yaml`` loads ``defs``."""

from __future__ import annotations

import dagster as dg

from .assets import features, ingest, llm, training
from .automation import full_pipeline, llm_shards, nightly_rerun, parallel_pipeline, raw_source_changed
from .resources import (
    DatasetSource,
    ImageEncoderResource,
    LLMResource,
    StorageResource,
    TextEncoderResource,
)

stage_modules = [ingest, features, llm, training]

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(stage_modules),
    asset_checks=dg.load_asset_checks_from_modules(stage_modules),
    jobs=[full_pipeline, parallel_pipeline, *([llm_shards] if llm_shards is not None else [])],
    sensors=[raw_source_changed],
    schedules=[nightly_rerun],
    resources={
        "storage": StorageResource(),
        "source": DatasetSource(),
        "text_encoder": TextEncoderResource(),
        "image_encoder": ImageEncoderResource(),
        "llm": LLMResource(),
    },
    # One step at a time: the heavy stages (LLM, encoders, training) each use every
    # core, and the LLM call log takes one writer. cdsr_parallel_pipeline runs
    # independent stages side by side where there are cores for it.
    executor=dg.in_process_executor,
)


def parallel_pipeline_job() -> dg.JobDefinition:
    """The parallel job, for ``dg.reconstructable`` (its steps run in other processes,
    which load it again from here)."""
    return defs.resolve_job_def(parallel_pipeline.name)
