"""The data-change sensor requests a run only when the source's content changes."""

from __future__ import annotations

import dagster as dg

from cdsr_pipeline.automation import raw_source_changed
from cdsr_pipeline.definitions import defs
from cdsr_pipeline.resources import DatasetSource, StorageResource


def _tick(cursor, source, storage):
    context = dg.build_sensor_context(cursor=cursor, resources={"source": source, "storage": storage})
    return raw_source_changed(context), context.cursor


def test_sensor_fires_on_change_only(tmp_path, demo_copy):
    source = DatasetSource(format="llmcdsr", path=str(demo_copy))
    storage = StorageResource(root=str(tmp_path / "storage"))
    first, cursor = _tick(None, source, storage)
    assert isinstance(first, dg.RunRequest)
    again, same_cursor = _tick(cursor, source, storage)
    assert isinstance(again, dg.SkipReason) and same_cursor == cursor
    with open(demo_copy / "valid.txt", "a") as handle:
        handle.write("999\t0,1,2\n")
    changed, new_cursor = _tick(cursor, source, storage)
    assert isinstance(changed, dg.RunRequest) and new_cursor != cursor


def test_definitions_load():
    assert defs.resolve_job_def("cdsr_full_pipeline") is not None
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"raw_interactions", "cdsr_sequences"} <= keys
