"""Dagster resources: where data comes from and where artifacts go (plus models, later).

Resources describe the environment a run works in; hyperparameters are ``dg.Config``
on the assets. Both are fingerprinted, so changing either reruns what depends on it.
"""

from __future__ import annotations

from typing import Optional

import dagster as dg
from pydantic import Field

from .data.sources import FORMATS, SourceSpec, demo_data_dir
from .storage import ArtifactStore


class StorageResource(dg.ConfigurableResource):
    """Artifact root. Empty: ``$CDSR_STORAGE`` or the project's ``storage/`` folder."""

    root: str = Field(default="", description="Folder holding artifacts/ and cache/; empty for the default.")

    def store(self) -> ArtifactStore:
        return ArtifactStore(self.root or None)


class DatasetSource(dg.ConfigurableResource):
    """The raw data the pipeline starts from. Default: the bundled demo sample."""

    format: str = Field(default="llmcdsr", description=f"One of: {', '.join(FORMATS)}.")
    path: str = Field(default="", description="Folder (Amazon dumps, releases) or file (interactions); empty: demo sample.")
    domains: Optional[list[str]] = Field(
        default=None,
        description="Two domain names, A first: Amazon category names, the interactions file's domain values, "
        "or display names for releases (default: from the folder name).",
    )
    items_path: Optional[str] = Field(default=None, description="Items file for the interactions format (optional).")

    def spec(self) -> SourceSpec:
        path = self.path or str(demo_data_dir())
        return SourceSpec(
            format=self.format,
            path=path,
            domains=tuple(self.domains) if self.domains else None,
            items_path=self.items_path,
        )
