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

from ..llm.shards import artifact_names, configured_shards
from ..storage import ArtifactStore, Manifest, MissingArtifactError, input_fingerprint


HEAVY_TAG = "cdsr/heavy"
"""Op tag of the stages that load every core or have one writer (``llm``: the call log;
``encoder``; ``training``): the parallel job runs at most one stage of each kind at once."""
HEAVY_KINDS = ("llm", "encoder", "training")


def upstream_names(context: dg.AssetExecutionContext) -> list[str]:
    """Names of the assets this asset depends on (its ``deps``)."""
    return sorted(key.path[-1] for key in context.assets_def.asset_deps[context.asset_key])


class UndeclaredInputError(RuntimeError):
    """An asset tried to read another asset's files without declaring it in ``deps``."""


class DeclaredInputs:
    """The upstream artifacts an asset may read: exactly its declared ``deps``.

    Reading any other asset's files raises :class:`UndeclaredInputError`, so what a
    stage reads is what its fingerprint (the data versions of its deps) covers.
    """

    def __init__(self, store: ArtifactStore, declared: list[str], reader: str, shards: int = 1):
        self.store = store
        self.declared = frozenset(declared)
        self.reader = reader
        self.shards = shards

    @classmethod
    def of(cls, context: dg.AssetExecutionContext, store: ArtifactStore) -> DeclaredInputs:
        return cls(store, upstream_names(context), context.asset_key.path[-1], configured_shards())

    def _allowed(self, asset: str) -> None:
        if asset not in self.declared:
            raise UndeclaredInputError(
                f"{self.reader} reads '{asset}', which is not among its deps ({', '.join(sorted(self.declared))})"
            )

    def manifest(self, asset: str) -> Manifest:
        """The manifest of ``asset`` (of its first shard when it is sharded: the shards
        share their config and LLM)."""
        self._allowed(asset)
        return self.store.require(artifact_names(asset, self.shards)[0])

    def path(self, asset: str, name: str) -> Path:
        (path,) = self.paths(asset, name)
        return path

    def paths(self, asset: str, name: str) -> list[Path]:
        """The file ``name`` of ``asset``: one path, or one per shard of a sharded asset."""
        self._allowed(asset)
        return [self.store.path(artifact, name) for artifact in artifact_names(asset, self.shards)]

    def asset_dir(self, asset: str) -> Path:
        self._allowed(asset)
        return self.store.asset_dir(asset)


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


def upstream_versions(store: ArtifactStore, names: list[str], shards: int) -> dict[str, str]:
    """The data versions of the artifacts of ``names`` (each shard of a sharded one)."""
    versions = {}
    for name in names:
        artifacts = artifact_names(name, shards)
        for shard, artifact in enumerate(artifacts):
            if len(artifacts) == 1:
                versions[artifact] = store.require(artifact).data_version
                continue
            try:  # a shard's folder is no asset to select: the command names the asset and the shard
                produce = f"CDSR_LLM_SHARDS={shards} cdsr run --select {name}; one shard: --shard {shard}"
                versions[artifact] = store.require(artifact, produce).data_version
            except MissingArtifactError as missing:
                raise MissingArtifactError(f"shard {shard} of {shards} of '{name}': {missing}") from None
    return versions


def run_stage(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    *,
    build: Callable[[Path], Mapping[str, Any]],
    config: Mapping[str, Any] | None = None,
    extra_inputs: Mapping[str, str] | None = None,
    inputs: Mapping[str, str] | None = None,
    markdown: Callable[[Mapping[str, Any]], str] | None = None,
    artifact: str | None = None,
) -> dg.MaterializeResult:
    """Materialize the current asset through the artifact store.

    ``build(folder)`` writes the asset's files into ``folder`` and returns JSON-able
    metadata. ``extra_inputs`` are identities that are not upstream assets (input
    file hashes, model identities). ``inputs`` replaces the data versions of the
    deps for an asset whose deps are optional (the report: whichever models exist).
    ``markdown`` renders a summary from the metadata. ``artifact`` is the store folder
    when it is not the asset's name (one shard of a sharded asset).
    """
    asset = artifact or context.asset_key.path[-1]
    code_version = context.assets_def.code_versions_by_key[context.asset_key] or "0"
    if inputs is None:
        inputs = upstream_versions(store, upstream_names(context), configured_shards())
    inputs = dict(inputs)
    inputs.update(extra_inputs or {})
    config = dict(config or {})
    fingerprint = input_fingerprint(code_version, config, inputs)

    # one writer per asset across processes (a scheduled run beside a manual one): the
    # second waits, then finds the first one's output in the cache instead of rebuilding
    with store.lock(asset, f"{asset} in Dagster run {context.run_id}", on_wait=context.log.warning):
        for folder in store.remove_leftovers(asset):
            context.log.info(f"{asset}: removed {folder}, left by a run that was killed while writing it")
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
