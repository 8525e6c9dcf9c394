"""Item shards of the per-item LLM stages (``CDSR_LLM_SHARDS``): stable buckets, one call
log per shard read together with the shared one, and a sharded run whose downstream
artifacts equal an unsharded run's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.llm import CallLog
from cdsr_pipeline.llm.session import call_log_path, locked_call_log, shard_call_log, shard_call_log_path
from cdsr_pipeline.llm.shards import (
    SHARDS_ENV,
    ShardConfigError,
    artifact_names,
    configured_shards,
    item_shard,
    items_of_shard,
)
from cdsr_pipeline.storage import ArtifactStore

from fault_support import recorded_calls


def test_shards_are_stable_disjoint_and_cover_every_item():
    ids = [f"B{n:09d}" for n in range(2000)]
    items = pa.table({"item_id": list(range(2000)), "domain": ["A"] * 1000 + ["B"] * 1000, "source_id": ids})
    parts = [items_of_shard(items, shard, 4) for shard in range(4)]
    assert sorted(i for part in parts for i in part["item_id"].to_pylist()) == list(range(2000))
    assert all(400 < part.num_rows < 600 for part in parts)  # hash buckets: about even
    # a shard is a function of (domain, source id) alone: dropping other items moves nothing
    fewer = items.slice(0, 700)
    assert items_of_shard(fewer, 2, 4)["item_id"].to_pylist() == [i for i in parts[2]["item_id"].to_pylist() if i < 700]
    assert item_shard("A", "B000000007", 4) == item_shard("A", "B000000007", 4) != item_shard("A", "B000000007", 1) + 9
    assert items_of_shard(items, 0, 1) is items
    assert artifact_names("item_tag_scores", 3) == [f"item_tag_scores.shard-{k}-of-3" for k in range(3)]
    assert artifact_names("item_tag_matrix", 3) == ["item_tag_matrix"]
    assert artifact_names("item_tag_scores", 1) == ["item_tag_scores"]


@pytest.mark.parametrize("value", ["0", "two", "-3", "5000"])
def test_a_bad_shard_count_is_one_clear_error(monkeypatch, value):
    from cdsr_pipeline.errors import UserInputError

    monkeypatch.setenv(SHARDS_ENV, value)
    with pytest.raises(ShardConfigError, match=f"{SHARDS_ENV}='{value}'"):
        configured_shards()
    assert issubclass(ShardConfigError, UserInputError)  # cdsr prints it as one line, exit code 2
    monkeypatch.delenv(SHARDS_ENV)
    assert configured_shards() == 1


def _row(key: str, answer: str) -> dict:
    return {
        "key": key, "stage": "augmentation", "item_key": f"item-{key}", "backend": "test", "model": "m", "identity": "{}",
        "template_hash": "t", "params": "{}", "prompt": "p", "prefix_hash": "h", "raw_answer": answer, "parsed": '"x"',
        "status": "ok", "error": None, "attempts": 1, "latency_s": 0.1, "created_at": "2026-12-07 01:00:00", "server": None,
    }


def test_a_shard_log_reads_the_shared_log_and_its_answers_move_into_it(tmp_path):
    store = ArtifactStore(tmp_path)
    with locked_call_log(store, "test import") as shared:
        shared.record([_row("imported", "from the export")], {"h": "prefix"})
    with shard_call_log(store, 1, "shard 1 test") as call_log:  # what llm_session(..., shard=1) opens
        assert call_log.lookup(["imported", "new"]).keys() == {"imported"}  # the shared log's answer is served
        call_log.record([_row("new", "asked by the shard")], {"h": "prefix"})
        assert shard_call_log_path(store, 1).exists()
        # while the shard runs, the shared log can be written (an import, another stage)
        with locked_call_log(store, "second import") as shared:
            shared.record([_row("later", "imported meanwhile")], {"h": "prefix"})
        assert call_log.lookup(["later"]).keys() == {"later"}
    assert not shard_call_log_path(store, 1).exists()  # moved into the shared log at the end
    assert {k: v[0] for k, v in recorded_calls(tmp_path).items()} == {
        "imported": "from the export", "new": "asked by the shard", "later": "imported meanwhile",
    }


def test_a_shard_log_left_by_a_killed_run_joins_the_shared_log_at_the_next_export_unless_its_shard_runs(tmp_path, capsys):
    store = ArtifactStore(tmp_path)
    for shard, key in ((0, "left-0"), (3, "left-3")):
        with CallLog(shard_call_log_path(store, shard)) as log:  # what a killed shard leaves
            log.record([_row(key, f"answer {key}")], {"h": "prefix"})
    messages = []
    with store.lock("llm_calls.shard-3", "shard 3 still running"):
        with locked_call_log(store, "export", on_wait=messages.append) as shared:
            assert set(shared.lookup(["left-0", "left-3"])) == {"left-0"}
    assert not shard_call_log_path(store, 0).exists() and shard_call_log_path(store, 3).exists()
    assert len(messages) == 1 and "llm_calls.shard-3.duckdb" in messages[0] and "shard 3 still running" in messages[0]
    with locked_call_log(store, "export") as shared:
        assert set(shared.lookup(["left-0", "left-3"])) == {"left-0", "left-3"}
    assert not shard_call_log_path(store, 3).exists()


LLM_RUN_CONFIG = """
ops:
  llm_augmented_text: {config: {max_tokens: 12}}
  domain_tag_vocabularies: {config: {tags_per_domain: 6, queries: 2, min_valid_tags: 2}}
  item_tag_scores: {config: {candidates: 3}}
resources:
  llm: {config: {n_threads: 1}}
"""
DOWNSTREAM = {
    "item_tag_matrix": "matrix-default.parquet",
    "item_llm_text_embeddings": "embeddings.parquet",
}


def _cdsr_run(storage: Path, release: Path, config: Path, shards: int, *extra: str) -> str:
    env = {**os.environ, SHARDS_ENV: str(shards)}
    command = [
        sys.executable, "-m", "cdsr_pipeline.cli", "run", "--storage", str(storage),
        "--select", "*item_tag_matrix,*item_llm_text_embeddings", "--source-format", "llmcdsr",
        "--source-path", str(release), "--domains", "Food,Kitchen", "--config", str(config), *extra,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_a_sharded_run_side_by_side_gives_the_unsharded_artifacts_and_a_rerun_asks_nothing(tmp_path):
    from cdsr_pipeline.data.sample import SampleSize, cut_llmcdsr_sample
    from cdsr_pipeline.data.sources import demo_data_dir

    release = tmp_path / "tiny-food-kitchen"
    size = SampleSize(items_a=8, items_b=8, train_users=30, single_domain_users=4, valid_users=8, test_users=8)
    cut_llmcdsr_sample(demo_data_dir(), release, size)
    config = tmp_path / "llm.yaml"
    config.write_text(LLM_RUN_CONFIG)

    _cdsr_run(tmp_path / "one", release, config, 1)
    sharded = _cdsr_run(tmp_path / "three", release, config, 3, "--parallel", "2")  # shards in their own processes
    assert sharded.count("shard ") >= 3 and "started (its own process)" in sharded

    store = ArtifactStore(tmp_path / "three")
    for stage in ("llm_augmented_text", "item_tag_scores"):
        assert store.read_manifest(stage) is None
        assert all(store.read_manifest(name) is not None for name in artifact_names(stage, 3))
    for asset, name in DOWNSTREAM.items():
        one = pq.read_table(tmp_path / "one" / "artifacts" / asset / name)
        three = pq.read_table(tmp_path / "three" / "artifacts" / asset / name)
        assert one.equals(three), f"{asset}/{name} differs between 1 and 3 shards"
    # every shard's answers are in the shared log now, the same calls as the unsharded run's
    assert recorded_calls(tmp_path / "three").keys() == recorded_calls(tmp_path / "one").keys()
    assert not list((tmp_path / "three" / "cache").glob("llm_calls.shard-*"))

    again = _cdsr_run(tmp_path / "three", release, config, 3)
    states = [line.split()[-1] for line in again.splitlines() if line.startswith("  ") and not line.lstrip().startswith("check")]
    assert states and all(state == "(unchanged)" for state in states), again  # every stage and shard reused
    with duckdb.connect(str(call_log_path(store)), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM llm_calls").fetchone()[0] == len(recorded_calls(tmp_path / "one"))


def test_shards_built_from_other_items_are_refused_downstream(tmp_path):
    from cdsr_pipeline.assets._stage import DeclaredInputs
    from cdsr_pipeline.assets.llm import StaleShardError, require_current_shards
    from cdsr_pipeline.data.schema import ITEMS
    from cdsr_pipeline.llm.shards import items_digest, shard_items_input

    store = ArtifactStore(tmp_path)

    def commit(asset: str, files: dict[str, pa.Table], inputs: dict[str, str]) -> None:
        with store.staging(asset) as folder:
            for name, table in files.items():
                pq.write_table(table, folder / name)
            store.commit(asset, folder, code_version="1", fingerprint=asset, inputs=inputs, config={}, metadata={})

    def items_table(n: int) -> pa.Table:
        return pa.table(
            {"item_id": list(range(n)), "domain": ["A"] * n, "domain_name": ["Food"] * n,
             "source_id": [f"B{i:09d}" for i in range(n)], "title": ["tea"] * n, "description": [None] * n,
             "image_ref": [None] * n},
            schema=ITEMS,
        )

    commit("cdsr_sequences", {"items.parquet": items_table(40)}, {})
    for shard in range(2):
        part = items_of_shard(items_table(40), shard, 2)
        commit(f"llm_augmented_text.shard-{shard}-of-2", {}, {shard_items_input(shard, 2): items_digest(part)})
    inputs = DeclaredInputs(store, ["cdsr_sequences", "llm_augmented_text"], "item_llm_text_embeddings", shards=2)
    require_current_shards(inputs, "llm_augmented_text")  # built from the items there are
    commit("cdsr_sequences", {"items.parquet": items_table(41)}, {})  # a new item (a scheduled rerun of the rest)
    with pytest.raises(StaleShardError, match=r"shard\(s\) \d of 2 of 'llm_augmented_text' were built from other items"):
        require_current_shards(inputs, "llm_augmented_text")
    unsharded = DeclaredInputs(store, ["cdsr_sequences", "llm_augmented_text"], "item_llm_text_embeddings")
    require_current_shards(unsharded, "llm_augmented_text")  # nothing to check without shards


def test_a_missing_shard_is_named_with_the_command_that_builds_it(tmp_path):
    from cdsr_pipeline.assets._stage import upstream_versions
    from cdsr_pipeline.storage import MissingArtifactError

    store = ArtifactStore(tmp_path)
    with store.staging("llm_augmented_text.shard-0-of-2") as folder:
        (folder / "augmented_text.parquet").write_bytes(b"x")
        store.commit("llm_augmented_text.shard-0-of-2", folder, code_version="1", fingerprint="f", inputs={}, config={}, metadata={})
    with pytest.raises(MissingArtifactError, match=r"shard 1 of 2 of 'llm_augmented_text': .*no manifest.*--select llm_augmented_text; one shard: --shard 1\)"):
        upstream_versions(store, ["llm_augmented_text"], 2)
    with pytest.raises(MissingArtifactError, match=r"cdsr run --select cdsr_sequences\)"):  # an unsharded one keeps require's hint
        upstream_versions(store, ["cdsr_sequences"], 2)
