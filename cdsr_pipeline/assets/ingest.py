"""Stage 1: raw source -> normalized tables -> filtered, split sequences."""


import json
from dataclasses import asdict

import dagster as dg
import polars as pl
from pydantic import Field

from ..data.ingest import QUARANTINE_FILE
from ..data.sequences import FilterConfig, build_sequences, format_statistics
from ..data.sources import ingest_source, source_files
from ..data.validation import CheckOutcome, check_contiguous_ids, check_minimums, check_no_leakage
from ..resources import DatasetSource, StorageResource
from ..storage import atomic_write_text
from ._config import dagster_config
from ._stage import DeclaredInputs, run_stage

SOURCE_REPORT = "source.json"


@dg.asset(
    group_name="ingest",
    code_version="2",  # 2: a user's repeated sequence line in a release is quarantined (it was merged)
    kinds={"duckdb", "parquet"},
    description="The raw source (Amazon dump, interactions file or released split) as normalized "
    "interactions/items tables; malformed records go to quarantine.parquet.",
)
def raw_interactions(context: dg.AssetExecutionContext, storage: StorageResource, source: DatasetSource) -> dg.MaterializeResult:
    store = storage.store()
    spec = source.spec()
    files = source_files(spec)
    hashes = store.file_hashes
    file_inputs = {f"file:{path.resolve()}": hashes.file_hash(path) for path in files}

    def build(folder):
        report = ingest_source(spec, folder, temp_dir=store.cache_dir("duckdb_tmp"))
        summary = asdict(report) | {"dataset": spec.dataset, "quarantine_share": report.quarantine_share}
        atomic_write_text(folder / SOURCE_REPORT, json.dumps(summary, indent=2))
        return {
            "dataset": spec.dataset,
            "format": spec.format,
            "domains": list(report.domain_names),
            "files": report.files,
            "lines_read": report.lines_read,
            "interactions": report.interactions,
            "items": report.items,
            "quarantined": report.quarantined_total,
            "quarantined_by_reason": report.quarantined,
            "quarantine_share": round(report.quarantine_share, 6),
            "notes": report.notes,
        }

    return run_stage(context, store, build=build, config=spec.as_dict(), extra_inputs=file_inputs)


class QuarantineLimit(dg.Config):
    max_share: float = Field(default=0.05, description="Fail when quarantined records / lines read exceeds this.")


@dg.asset_check(asset=raw_interactions, description="Share of quarantined records stays under a limit.")
def quarantine_share_within_limit(storage: StorageResource, config: QuarantineLimit) -> dg.AssetCheckResult:
    store = storage.store()
    report = json.loads(store.path("raw_interactions", SOURCE_REPORT).read_text())
    share = report["quarantine_share"]
    quarantine = pl.read_parquet(store.path("raw_interactions", QUARANTINE_FILE))
    examples = quarantine.head(5).select("source_file", "line", "reason").to_dicts()
    return dg.AssetCheckResult(
        passed=share <= config.max_share,
        metadata={
            "quarantine_share": share,
            "limit": config.max_share,
            "quarantined_by_reason": dg.MetadataValue.json(report["quarantined"]),
            "examples": dg.MetadataValue.json(examples),
        },
    )


SequencesSettings = dagster_config(
    FilterConfig, "SequencesSettings", "Raw-data preparation thresholds (LLM-EMF §4 defaults). Released splits are kept exactly."
)


@dg.asset(
    deps=[raw_interactions],
    group_name="ingest",
    code_version="2",
    kinds={"duckdb", "parquet"},
    description="Users active in both domains, filtered and split chronologically; global item ids "
    "(domain A first); items, train/valid/test sequences and the Table 1 statistics.",
)
def cdsr_sequences(context: dg.AssetExecutionContext, config: SequencesSettings, storage: StorageResource) -> dg.MaterializeResult:
    store = storage.store()
    source_dir = DeclaredInputs.of(context, store).asset_dir("raw_interactions")

    def build(folder):
        report = json.loads((source_dir / SOURCE_REPORT).read_text())
        result = build_sequences(
            source_dir,
            folder,
            dataset=report["dataset"],
            domain_names=tuple(report["domain_names"]),
            config=FilterConfig(**config.model_dump()),
            temp_dir=store.cache_dir("duckdb_tmp"),
            notes=report["notes"],
        )
        return {"stats": result.stats, "protocol": result.protocol, "filter_rounds": result.filter_rounds}

    return run_stage(
        context,
        store,
        build=build,
        config=config.model_dump(),
        markdown=lambda meta: "```\n" + format_statistics(meta["stats"]) + "\n```",
    )


def _check_result(outcome: CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.description,
        metadata={key: dg.MetadataValue.json(value) if isinstance(value, (dict, list)) else value for key, value in outcome.details.items() if value is not None},
    )


@dg.asset_check(asset=cdsr_sequences, description="Item ids are contiguous, domain A first; sequences reference known items.")
def contiguous_item_ids(storage: StorageResource) -> dg.AssetCheckResult:
    return _check_result(check_contiguous_ids(storage.store().asset_dir("cdsr_sequences")))


@dg.asset_check(asset=cdsr_sequences, description="No split leakage: every valid/test target comes after the user's training data.")
def no_split_leakage(storage: StorageResource) -> dg.AssetCheckResult:
    return _check_result(check_no_leakage(storage.store().asset_dir("cdsr_sequences")))


@dg.asset_check(asset=cdsr_sequences, description="Per-user, per-domain and per-item minimums hold (raw sources).")
def per_domain_minimums(storage: StorageResource) -> dg.AssetCheckResult:
    store = storage.store()
    manifest = store.require("cdsr_sequences")
    released = manifest.metadata["protocol"].startswith("released")
    config = FilterConfig(**manifest.config)
    return _check_result(check_minimums(store.asset_dir("cdsr_sequences"), config, released))

