"""One declaration per setting: a library config dataclass's field carries its default
and the one-line description that the Dagster launchpad shows
(:func:`cdsr_pipeline.assets._config.dagster_config` turns the dataclass into the
asset's config class)."""

from __future__ import annotations

import dataclasses
from typing import Any


def setting(default: Any, doc: str | None = None) -> Any:
    """A dataclass field with ``default`` and the description ``doc``."""
    return dataclasses.field(default=default, metadata={"doc": doc} if doc else {})
