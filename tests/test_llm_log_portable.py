"""``cdsr llm-log export`` / ``import``: recorded answers moved between storages.

Unit level: export then import into an empty log serves every answer (nothing asked
again), import is idempotent, a conflicting answer is counted and not replaced, and
a file of another schema or with a tampered row is refused whole. End to end: the LLM
stages of a tiny release rerun in a new storage from an imported export with zero
calls and byte-identical outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdsr_pipeline.cli import main
from cdsr_pipeline.llm.calllog import Answer, AnswerError, CallLog, LLMCall, run_logged_calls
from cdsr_pipeline.llm.portable import CallExportError, export_calls, import_calls, read_call_export
from cdsr_pipeline.llm.types import CompletionRequest, Prompt

IDENTITY = {"backend": "test", "model": "m1", "gguf_sha256": "ab" * 32}


def calls_for(words: list[str]) -> list[LLMCall]:
    return [LLMCall(f"item/{w}", CompletionRequest(Prompt("Few-shot prefix\n", w), max_tokens=4)) for w in words]


class Answerer:
    """Answers each body upper-cased (or with ``suffix``) and records what it was asked."""

    def __init__(self, suffix: str = ""):
        self.asked: list[str] = []
        self.suffix = suffix

    def __call__(self, requests):
        for index, request in enumerate(requests):
            self.asked.append(request.prompt.body)
            yield index, Answer(request.prompt.body.upper() + self.suffix, 0.01)


def parse(call, text):
    if not text.isalpha():
        raise AnswerError(f"not a word: {text!r}")
    return text


def ask(call_log: CallLog, words: list[str], answerer: Answerer):
    return run_logged_calls(
        stage="augmentation", template_hash="t1", identity=IDENTITY, calls=calls_for(words), execute=answerer,
        parse=parse, call_log=call_log, max_attempts=1,
    )


def test_export_import_serves_every_answer_and_is_idempotent(tmp_path):
    with CallLog(tmp_path / "a.duckdb") as log_a:
        ask(log_a, ["tea", "jam", "oil"], Answerer())
        written, left_out, files = export_calls(log_a, tmp_path / "answers.parquet", stage="augmentation")
    assert (written, left_out, files) == (3, 0, [tmp_path / "answers.parquet"])
    table = pq.read_table(tmp_path / "answers.parquet")
    assert set(table.column("raw_answer").to_pylist()) == {"TEA", "JAM", "OIL"}
    assert pq.read_metadata(tmp_path / "answers.parquet").row_group(0).column(0).compression == "ZSTD"

    with CallLog(tmp_path / "b.duckdb") as log_b:
        report = import_calls(log_b, read_call_export(tmp_path / "answers.parquet"))
        assert (report.inserted, report.already_present, report.conflicts) == (3, 0, [])
        again = import_calls(log_b, read_call_export(tmp_path / "answers.parquet"))
        assert (again.inserted, again.already_present) == (0, 3)
        answerer = Answerer()
        records, stats = ask(log_b, ["tea", "jam", "oil"], answerer)
    assert answerer.asked == [] and stats.cached == 3
    assert [r.parsed for r in records] == ["TEA", "JAM", "OIL"]


def test_a_large_export_is_split_into_parts_that_fit_and_import_reads_them_all(tmp_path):
    words = ["".join("abcdefghij"[int(d)] for d in f"{i:03d}") + "x" * (i % 7) for i in range(300)]
    with CallLog(tmp_path / "a.duckdb") as log_a:
        ask(log_a, words, Answerer())
        whole = export_calls(log_a, tmp_path / "answers.parquet", max_file_bytes=None)[2][0].stat().st_size
        limit = whole // 3
        written, _, files = export_calls(log_a, tmp_path / "answers.parquet", max_file_bytes=limit)
    assert written == 300 and len(files) >= 3
    assert [f.name for f in files] == [f"answers.part{i:02d}.parquet" for i in range(1, len(files) + 1)]
    assert all(f.stat().st_size <= limit for f in files)
    assert not (tmp_path / "answers.parquet").exists()  # the earlier single file is replaced by the parts
    assert sum(pq.read_metadata(f).num_rows for f in files) == 300

    assert main(["llm-log", "import", str(tmp_path / "answers.parquet"), "--storage", str(tmp_path / "b")]) == 0
    with CallLog(tmp_path / "b" / "cache" / "llm_calls.duckdb") as log_b:
        answerer = Answerer()
        _, stats = ask(log_b, words, answerer)
    assert answerer.asked == [] and stats.cached == 300


def test_conflicting_answer_is_reported_and_not_replaced(tmp_path):
    with CallLog(tmp_path / "a.duckdb") as log_a:
        ask(log_a, ["tea", "jam"], Answerer())
        export_calls(log_a, tmp_path / "answers.parquet")
    with CallLog(tmp_path / "b.duckdb") as log_b:
        ask(log_b, ["tea"], Answerer(suffix="X"))  # same key, another answer already recorded
        report = import_calls(log_b, read_call_export(tmp_path / "answers.parquet"))
        assert report.inserted == 1 and len(report.conflicts) == 1
        assert report.conflicts[0]["item_key"] == "item/tea"
        assert "1 conflicting" in report.summary()
        answerer = Answerer()
        records, _ = ask(log_b, ["tea", "jam"], answerer)
    assert answerer.asked == [] and [r.parsed for r in records] == ["TEAX", "JAM"]


def test_wrong_schema_and_tampered_rows_are_refused(tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"item": ["a"], "answer": ["b"]}), other)
    with pytest.raises(CallExportError, match="not an LLM call-log export"):
        read_call_export(other)
    with pytest.raises(CallExportError, match="not a readable parquet file"):
        (tmp_path / "junk.parquet").write_text("not parquet")
        read_call_export(tmp_path / "junk.parquet")

    with CallLog(tmp_path / "a.duckdb") as log_a:
        ask(log_a, ["tea", "jam"], Answerer())
        export_calls(log_a, tmp_path / "answers.parquet")
    table = pq.read_table(tmp_path / "answers.parquet")
    # another model's identity under the recorded key: the key no longer verifies
    identity = json.dumps(IDENTITY | {"gguf_sha256": "cd" * 32}, sort_keys=True)
    tampered = table.set_column(table.schema.get_field_index("identity"), "identity", pa.array([identity] * 2))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), tmp_path / "tampered.parquet")
    with pytest.raises(CallExportError, match="key does not match"):
        read_call_export(tmp_path / "tampered.parquet")
    dropped = table.drop_columns(["latency_s"]).replace_schema_metadata(table.schema.metadata)
    pq.write_table(dropped, tmp_path / "dropped.parquet")
    with pytest.raises(CallExportError, match="schema does not match"):
        read_call_export(tmp_path / "dropped.parquet")


def test_cli_round_trip_and_clear_errors(tmp_path, capsys):
    storage_a, storage_b = tmp_path / "a", tmp_path / "b"
    with CallLog(storage_a / "cache" / "llm_calls.duckdb") as log_a:
        ask(log_a, ["tea"], Answerer())
    out = tmp_path / "answers.parquet"
    assert main(["llm-log", "export", str(out), "--storage", str(storage_a)]) == 0
    assert main(["llm-log", "import", str(out), "--storage", str(storage_b)]) == 0
    assert "1 imported" in capsys.readouterr().out
    assert main(["llm-log", "export", str(out), "--storage", str(tmp_path / "empty")]) == 2
    assert "no LLM call log" in capsys.readouterr().err
    (tmp_path / "bad.parquet").write_text("x")
    assert main(["llm-log", "import", str(tmp_path / "bad.parquet"), "--storage", str(storage_b)]) == 2
    assert "not a readable parquet file" in capsys.readouterr().err



def test_import_waits_for_the_writer_of_the_call_log_and_names_it(tmp_path, capsys):
    """An LLM stage holds the storage's call-log lock while it asks: an import beside it
    waits (saying for whom) instead of failing on DuckDB's file lock, then imports."""
    import threading

    from cdsr_pipeline.storage import ArtifactStore

    with CallLog(tmp_path / "a" / "cache" / "llm_calls.duckdb") as log_a:
        ask(log_a, ["tea"], Answerer())
    out = tmp_path / "answers.parquet"
    assert main(["llm-log", "export", str(out), "--storage", str(tmp_path / "a")]) == 0
    held, release = threading.Event(), threading.Event()

    def stage() -> None:
        with ArtifactStore(tmp_path / "b").lock("llm_calls", "item_tag_scores in Dagster run r1"):
            held.set()
            release.wait(30)

    writer = threading.Thread(target=stage)
    writer.start()
    held.wait(10)
    threading.Timer(1.5, release.set).start()
    try:
        assert main(["llm-log", "import", str(out), "--storage", str(tmp_path / "b")]) == 0
    finally:
        release.set()
        writer.join()
    captured = capsys.readouterr()
    assert "item_tag_scores in Dagster run r1" in captured.err
    assert "1 imported" in captured.out


LLM_STAGES = {
    "llm_augmented_text": "augmented_text.parquet",
    "domain_tag_vocabularies": "tag_vocabulary.parquet",
    "item_tag_scores": "scores.parquet",
}
LLM_CONFIG = {
    "ops": {
        "llm_augmented_text": {"config": {"max_tokens": 12}},
        "domain_tag_vocabularies": {"config": {"tags_per_domain": 6, "queries": 2, "min_valid_tags": 2}},
        "item_tag_scores": {"config": {"candidates": 3}},
    }
}


def _materialize_llm_stages(storage: Path, release: Path):
    import dagster as dg

    from cdsr_pipeline.definitions import defs
    from cdsr_pipeline.resources import (
        DatasetSource,
        ImageEncoderResource,
        LLMResource,
        StorageResource,
        TextEncoderResource,
    )

    resources = {
        "storage": StorageResource(root=str(storage)),
        "source": DatasetSource(format="llmcdsr", path=str(release), domains=["Food", "Kitchen"]),
        "text_encoder": TextEncoderResource(device="cpu"),
        "image_encoder": ImageEncoderResource(device="cpu"),
        "llm": LLMResource(generation_batch=8),
    }
    result = dg.materialize(
        defs.assets, resources=resources, run_config=LLM_CONFIG,
        selection=["raw_interactions", "cdsr_sequences", *LLM_STAGES],
    )
    assert result.success
    return {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}


@pytest.mark.slow
def test_llm_stages_rerun_from_an_import_with_zero_calls(tmp_path):
    from cdsr_pipeline.data.sample import SampleSize, cut_llmcdsr_sample
    from cdsr_pipeline.data.sources import demo_data_dir

    release = tmp_path / "tiny-food-kitchen"
    size = SampleSize(items_a=8, items_b=8, train_users=30, single_domain_users=4, valid_users=8, test_users=8)
    cut_llmcdsr_sample(demo_data_dir(), release, size)
    first = _materialize_llm_stages(tmp_path / "a", release)
    assert all(first[stage]["asked"].value > 0 for stage in LLM_STAGES)
    exported = tmp_path / "answers.parquet"
    assert main(["llm-log", "export", str(exported), "--storage", str(tmp_path / "a")]) == 0
    assert main(["llm-log", "import", str(exported), "--storage", str(tmp_path / "b")]) == 0

    second = _materialize_llm_stages(tmp_path / "b", release)
    for stage, name in LLM_STAGES.items():
        assert second[stage]["asked"].value == 0, stage
        assert second[stage]["cached"].value == first[stage]["calls"].value
        a = (tmp_path / "a" / "artifacts" / stage / name).read_bytes()
        b = (tmp_path / "b" / "artifacts" / stage / name).read_bytes()
        assert a == b, f"{stage}/{name} differs after import"


def test_bulk_record_keeps_the_last_row_of_a_key_and_a_bad_batch_records_nothing(tmp_path):
    with CallLog(tmp_path / "log.duckdb") as call_log:
        ask(call_log, ["tea"], Answerer())
        exported = read_call_export(export_calls(call_log, tmp_path / "one.parquet")[2][0]).to_pylist()[0]
        row = {k: v for k, v in exported.items() if k != "prefix"} | {"prefix_hash": None, "server": None}
        call_log.record([row | {"raw_answer": "first"}, row | {"raw_answer": "second"}])
        assert call_log.lookup([row["key"]])[row["key"]].raw_answer == "second"
        before = call_log.count()
        with pytest.raises(Exception, match="NOT NULL"):
            call_log.record([row | {"key": "other", "raw_answer": "x"}, row | {"key": "broken", "stage": None}])
        assert call_log.count() == before and not call_log.lookup(["other", "broken"])  # one transaction
        call_log.record([row | {"key": "text-time", "created_at": "2026-12-03 10:00:00"}])  # a run's timestamp text
        assert call_log.lookup(["text-time"])
