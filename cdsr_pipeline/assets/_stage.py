"""The one pattern every asset follows: fingerprint inputs, reuse or rebuild, report.

Dagster 1.13 runs every selected asset when asked (``dagster asset materialize``
always executes; ``AutomationCondition.eager()`` fires on any upstream run, see
dagster-io/dagster#22850 and #25439). The artifacts therefore carry their own input
fingerprint (code version, config, data versions of upstream artifacts, identities of
models and files), and an asset whose fingerprint is unchanged reuses its output and
reports the same :class:`dagster.DataVersion`, so nothing downstream changes either.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dagster as dg

from ..storage import ArtifactStore, input_fingerprint


def upstream_names(context: dg.AssetExecutionContext) -> list[str]:
    """Names of the assets this asset depends on (its ``deps``)."""
    return sorted(key.path[-1] for key in context.assets_def.asset_deps[context.asset_key])


def config_dict(config: dg.Config | None) -> dict[str, Any]:
    return config.model_dump() if config is not None else {}


def to_dagster_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Plain JSON metadata as Dagster metadata values (tables/markdown kept as they are)."""
    converted: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(value, dg.MetadataValue):
            converted[key] = value
        elif isinstance(value, (dict, list)):
            converted[key] = dg.MetadataValue.json(value)
        elif value is None:
            converted[key] = dg.MetadataValue.text("-")
        else:
            converted[key] = value
    return converted


def run_stage(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    *,
    build: Callable[[Path], Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    extra_inputs: Mapping[str, str] | None = None,
    markdown: Callable[[Mapping[str, Any]], str] | None = None,
) -> dg.MaterializeResult:
    """Materialize the current asset through the artifact store.

    ``build(folder)`` writes the asset's files into ``folder`` and returns JSON-able
    metadata. ``extra_inputs`` are identities that are not upstream assets (input
    file hashes, model identities). ``markdown`` renders a summary from the metadata.
    """
    asset = context.asset_key.path[-1]
    code_version = context.assets_def.code_versions_by_key[context.asset_key] or "0"
    inputs = {name: store.require(name).data_version for name in upstream_names(context)}
    inputs.update(extra_inputs or {})
    config = dict(config or {})
    fingerprint = input_fingerprint(code_version, config, inputs)

    manifest = store.cached(asset, fingerprint)
    reused = manifest is not None
    if reused:
        context.log.info(f"{asset}: inputs, config and code unchanged (fingerprint {fingerprint[:12]}); reusing {store.asset_dir(asset)}")
    else:
        started = time.perf_counter()
        with store.staging(asset) as folder:
            metadata = dict(build(folder))
            metadata["build_seconds"] = round(time.perf_counter() - started, 2)
            manifest = store.commit(
                asset,
                folder,
                code_version=code_version,
                fingerprint=fingerprint,
                inputs=inputs,
                config=config,
                metadata=metadata,
            )
    shown = dict(manifest.metadata)
    if markdown is not None:
        shown["summary"] = dg.MetadataValue.md(markdown(manifest.metadata))
    shown.update(
        {
            "reused": reused,
            "fingerprint": fingerprint[:16],
            "artifact_dir": dg.MetadataValue.path(str(store.asset_dir(asset))),
            "inputs": dict(inputs),
        }
    )
    return dg.MaterializeResult(metadata=to_dagster_metadata(shown), data_version=dg.DataVersion(manifest.data_version))
