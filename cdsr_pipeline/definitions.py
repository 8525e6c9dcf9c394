"""The Dagster definitions of the pipeline: ``dagster dev -w workspace.yaml`` loads ``defs``."""

from __future__ import annotations

import dagster as dg

from .assets import ingest
from .resources import DatasetSource, StorageResource

all_assets = dg.load_assets_from_modules([ingest])
all_checks = dg.load_asset_checks_from_modules([ingest])

full_pipeline = dg.define_asset_job(
    "cdsr_full_pipeline",
    selection=dg.AssetSelection.all(),
    description="Every stage, from the raw source to the evaluation report. Unchanged stages reuse their artifacts.",
)

defs = dg.Definitions(
    assets=all_assets,
    asset_checks=all_checks,
    jobs=[full_pipeline],
    resources={
        "storage": StorageResource(),
        "source": DatasetSource(),
    },
)
