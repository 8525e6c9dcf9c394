"""The whole DAG, raw release to report, on a tiny real sample with the real models.

A 12 + 12 item sample cut from the bundled demo (same rules as the demo itself), the
bundled MiniLM text encoder, the embedded SmolLM2 and two training epochs: every
asset materializes, every asset check passes, the report states dataset and
protocols, and an unchanged rerun reuses every stage.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from cdsr_pipeline.data.sample import SampleSize, cut_llmcdsr_sample
from cdsr_pipeline.data.sources import demo_data_dir
from cdsr_pipeline.assets.training import TRAINING_ASSETS
from cdsr_pipeline.automation import full_pipeline
from cdsr_pipeline.definitions import defs
from cdsr_pipeline.resources import (
    DatasetSource,
    ImageEncoderResource,
    LLMResource,
    StorageResource,
    TextEncoderResource,
)

pytestmark = pytest.mark.slow

TRAINING = {"epochs": 2, "patience": 2, "hidden_dim": 32, "batch_size": 64, "num_negatives": 50}
TRAINED = [spec.name for spec in TRAINING_ASSETS if spec.in_full_pipeline] + ["tema_table5_runs"]
RUN_CONFIG = {
    "ops": {
        "llm_augmented_text": {"config": {"max_tokens": 12}},
        "domain_tag_vocabularies": {"config": {"tags_per_domain": 6, "queries": 2, "min_valid_tags": 2}},
        "item_tag_scores": {"config": {"candidates": 3}},
        **{name: {"config": TRAINING} for name in TRAINED},
    }
}


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "tiny-food-kitchen"
    size = SampleSize(items_a=12, items_b=12, train_users=40, single_domain_users=5, valid_users=12, test_users=12)
    cut_llmcdsr_sample(demo_data_dir(), out, size)
    return out


def _materialize(storage: Path, release: Path) -> dg.ExecuteInProcessResult:
    resources = {
        "storage": StorageResource(root=str(storage)),
        "source": DatasetSource(format="llmcdsr", path=str(release), domains=["Food", "Kitchen"]),
        "text_encoder": TextEncoderResource(device="cpu"),
        "image_encoder": ImageEncoderResource(device="cpu"),
        "llm": LLMResource(generation_batch=8),
    }
    selection = full_pipeline.selection | dg.AssetSelection.assets("tema_table5_runs")
    return dg.materialize([*defs.assets, *defs.asset_checks], resources=resources, run_config=RUN_CONFIG, selection=selection)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_release):
    storage = tmp_path_factory.mktemp("storage")
    return storage, _materialize(storage, tiny_release)


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    return {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}


def test_every_asset_materializes_and_every_check_passes(first_run):
    _, result = first_run
    assert result.success
    built = set(_metadata(result))
    everything = {key.path[-1] for key in defs.resolve_asset_graph().get_all_asset_keys()}
    optional = {spec.name for spec in TRAINING_ASSETS if not spec.in_full_pipeline} - {"tema_table5_runs"}
    assert built == everything - optional
    checks = result.get_asset_check_evaluations()
    assert checks and all(check.passed for check in checks), [c.check_name for c in checks if not c.passed]


def test_report_states_dataset_protocols_and_paper_caveat(first_run):
    storage, _ = first_run
    report = (storage / "artifacts" / "evaluation_report" / "report.md").read_text()
    assert "tiny-food-kitchen" in report
    assert "Results: 50 sampled negatives (the papers use 999)" in report
    assert "Results: full ranking over the target domain" in report
    assert "Different data: not comparable" in report
    for model in ("TEMA-LLM", "LLM-EMF", "LLM-EMF (title text only)", "SASRec", "GRU4Rec", "Popularity", "TEMA T5: one_hot"):
        assert model in report
    assert "Not in this report (not materialized yet)" in report and "`tema_table6_runs`" in report
    assert (storage / "artifacts" / "evaluation_report" / "report.html").is_file()


def test_unchanged_rerun_reuses_every_stage(first_run, tiny_release):
    storage, first = first_run
    second = _materialize(storage, tiny_release)
    assert second.success
    before, after = _metadata(first), _metadata(second)
    for asset, meta in after.items():
        assert meta["reused"].value, f"{asset} was rebuilt"
        assert meta["fingerprint"].value == before[asset]["fingerprint"].value


def test_recommend_matches_full_sort_predict_and_explains_with_tags(first_run, capsys):
    import json

    import numpy as np
    import polars as pl
    import torch

    from cdsr_pipeline.cli import find_run, main
    from cdsr_pipeline.model.data import evaluation_batches, load_sequences, make_batch
    from cdsr_pipeline.model.recommend import RecommendError, load_run, recommend

    storage, _ = first_run
    run = load_run(find_run(storage, "TEMA-LLM"))
    assert run.tag_rows is not None and run.tag_names
    # the scores of a test history equal what evaluation computes for that row
    sequences = storage / "artifacts" / "cdsr_sequences"
    test = load_sequences(sequences, "test", max_len=run.max_len)
    domain, rows = next(evaluation_batches(test, run.domains, 4))
    row = int(rows[0])
    history = test.inputs[row, : test.lengths[row]].tolist()
    with torch.no_grad():
        expected = run.model.full_sort_predict(make_batch(test, np.array([row]), run.domains, run.views))[0]
    results = recommend(run, history, domain, k=5)
    top = torch.argsort(expected, descending=True, stable=True)[:5] + run.domains.first_id(domain)
    assert [r.item_id for r in results] == top.tolist()
    for r in results:
        assert r.score == pytest.approx(float(expected[r.item_id - run.domains.first_id(domain)]), rel=1e-5)
        assert sum(r.towers.values()) == pytest.approx(r.score, rel=1e-5)
        assert set(r.towers) >= {"id", "tag"}
    # source ids (ASINs) name the same items as global ids
    items = pl.read_parquet(sequences / "items.parquet")
    asins = [items.filter(pl.col("item_id") == i)["source_id"][0] for i in history]
    assert [r.item_id for r in recommend(run, asins, domain, k=5)] == top.tolist()
    seen = recommend(run, history, domain, k=5, exclude_seen=True)
    assert not {r.item_id for r in seen} & set(history)
    # bad requests are one clear error each
    for bad, message in (
        (dict(history=[], domain="A"), "empty"),
        (dict(history=["nosuch"], domain="A"), "unknown item ids: nosuch"),
        (dict(history=history, domain="Books"), "unknown domain"),
        (dict(history=history, domain="A", k=0), "k must be an integer between"),
    ):
        with pytest.raises(RecommendError, match=message):
            recommend(run, bad["history"], bad["domain"], bad.get("k", 5))
    # the command: JSON out, one-line errors
    args = ["recommend", "--storage", str(storage), "--run", "TEMA-LLM", "--history", ",".join(asins), "--domain", "B", "--json"]
    assert main(args) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["run"] == "TEMA-LLM" and len(answer["recommendations"]) == 10
    assert main(["recommend", "--storage", str(storage), "--history", "nosuch", "--domain", "A"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown item ids: nosuch")


def test_towers_split_the_runs_ranking_and_together_give_its_evaluation(first_run, capsys):
    import json

    from cdsr_pipeline.cli import find_run, main
    from cdsr_pipeline.model.data import load_sequences
    from cdsr_pipeline.model.diagnostics import random_mrr, tower_contributions, view_contributions
    from cdsr_pipeline.model.recommend import load_run

    storage, _ = first_run
    folder = find_run(storage, "TEMA-LLM")
    run = load_run(folder)
    rows = tower_contributions(run.model, load_sequences(run.sequences, "test", max_len=run.max_len), run.domains)
    metrics = json.loads((folder / "metrics.json").read_text())["best_checkpoint"]["test"]
    for domain in "AB":
        mine = {row.part: row for row in rows if row.domain == domain}
        assert set(mine) == {*run.model.towers, "all"}
        # the towers' parts together rank exactly as the evaluation did
        assert mine["all"].mrr_alone == pytest.approx(metrics[domain]["full"]["mrr"], abs=1e-9)
        assert sum(row.top10_share for tower, row in mine.items() if tower != "all") == pytest.approx(1.0)
        assert all(0 < row.mrr_alone <= 1 for row in mine.values())
    views = view_contributions(run.model, load_sequences(run.sequences, "test", max_len=run.max_len), run.domains)
    for domain in "AB":
        mine = {row.part: row for row in views if row.domain == domain}
        assert set(mine) == {"X", "Y", "XY", "all"}
        assert mine["all"].mrr_alone == pytest.approx(metrics[domain]["full"]["mrr"], abs=1e-9)
        assert sum(row.top10_share for view, row in mine.items() if view != "all") == pytest.approx(1.0)
    assert random_mrr(1) == 1.0 and random_mrr(2) == pytest.approx(0.75)
    assert main(["towers", "--storage", str(storage), "--run", "TEMA-LLM"]) == 0
    out = capsys.readouterr().out
    assert "| tag |" in out and "all (the run's ranking)" in out and "a random ranking's MRR" in out
    assert "By sequence" in out and "| XY (merged) | 0.10 |" in out
    assert "The features alone, no training" in out and "| title text |" in out and "| tags |" in out
    assert main(["towers", "--storage", str(storage), "--run", "TEMA-LLM", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert {(row["domain"], row["part"]) for row in answer["views"]} == {(d, v) for d in "AB" for v in ("X", "Y", "XY", "all")}
    alone = answer["features_alone"]
    assert {(row["domain"], row["feature"]) for row in alone} >= {(d, f) for d in "AB" for f in ("tex", "llm", "tag")}
    assert all(0 < row["mrr"] <= 1 for row in alone)
    assert main(["towers", "--storage", str(storage), "--run", "Popularity"]) == 2
    assert "no towers" in capsys.readouterr().err


def test_sequence_weights_at_the_trained_weights_give_the_evaluation(first_run, capsys):
    import json

    from cdsr_pipeline.cli import find_run, main
    from cdsr_pipeline.model.data import load_sequences
    from cdsr_pipeline.model.diagnostics import TRAINED, sequence_weight_search
    from cdsr_pipeline.model.evaluate import EvaluationSplit
    from cdsr_pipeline.model.recommend import load_run

    storage, _ = first_run
    folder = find_run(storage, "TEMA-LLM")
    run = load_run(folder)
    config = json.loads((folder / "config.json").read_text())["train_config"]
    splits = [
        EvaluationSplit.create(s, load_sequences(run.sequences, s, max_len=run.max_len), run.domains, config["num_negatives"], config["negatives_seed"])
        for s in ("valid", "test")
    ]
    rows = sequence_weight_search(run.model, splits, run.domains, others=(0.3, 1.0), merged=(0.1, 1.0))
    assert len(rows) == 5 and [r.selection() for r in rows] == sorted((r.selection() for r in rows), reverse=True)
    trained = next(r for r in rows if r.label == TRAINED)
    same = next(r for r in rows if (r.other, r.merged) == (0.3, 0.1))  # the preset's target-relative weights
    best = json.loads((folder / "metrics.json").read_text())["best_checkpoint"]
    for split, mrrs in (("valid", trained.valid), ("test", trained.test)):
        for domain in "AB":
            for protocol in ("sampled", "full"):
                assert mrrs[domain][protocol] == pytest.approx(best[split][domain][protocol]["mrr"], abs=1e-9)
    assert same.valid == trained.valid and same.test == trained.test
    assert main(["sequence-weights", "--storage", str(storage), "--run", "TEMA-LLM"]) == 0
    out = capsys.readouterr().out
    assert "| trained |" in out and "Test, at the weights chosen on validation" in out and "| other 1, merged 0.3 |" in out
    assert main(["sequence-weights", "--storage", str(storage), "--run", "SASRec"]) == 2
    assert "no three sequences" in capsys.readouterr().err


def test_http_api_answers_like_the_library_and_refuses_bad_requests(first_run):
    import asyncio
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    from cdsr_pipeline.cli import find_run
    from cdsr_pipeline.model.recommend import load_run, recommend
    from cdsr_pipeline.serve import create_app

    storage, _ = first_run
    run = load_run(find_run(storage, "TEMA-LLM"))
    app = create_app(run, max_wait_ms=20)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        health = httpx.get(f"{base}/health").json()
        assert health["run"] == "TEMA-LLM" and health["config_digest"] and "item_tag_matrix" in health["data_versions"]
        assert httpx.get(f"{base}/items/0").json()["domain"] == "A"
        assert httpx.get(f"{base}/items/nosuch").status_code == 404

        histories = [[0, 1, 15], [2, 14], [3], [13, 4, 5]]
        expected = [[r.to_dict() for r in recommend(run, h, "B", 5)] for h in histories]

        async def concurrent():
            async with httpx.AsyncClient(base_url=base) as client:
                replies = await asyncio.gather(
                    *(client.post("/recommend", json={"history": h, "domain": "B", "k": 5}) for h in histories)
                )
            return [reply.json()["recommendations"] for reply in replies]

        before = app.state.batcher.batches
        answers = asyncio.run(concurrent())
        # batched with other histories (padded to another width): the same items, scores equal to float rounding
        for got, want in zip(answers, expected, strict=True):
            assert [r["item_id"] for r in got] == [r["item_id"] for r in want]
            assert [r["tags"] for r in got] == [r["tags"] for r in want]
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)
        assert app.state.batcher.batches - before < len(histories)  # concurrent requests shared forward passes

        for body, status, message in (
            (b"{not json", 400, "malformed JSON"),
            (b"[1, 2]", 400, "JSON object"),
            (b'{"history": [0], "domain": "A", "path": "/etc/passwd"}', 400, "unknown fields: path"),
            (b'{"history": "0", "domain": "A"}', 422, "history must be a list"),
            (b'{"history": [], "domain": "A"}', 422, "empty"),
            (b'{"history": [999999, "x"], "domain": "A"}', 422, "unknown item ids: 999999, x"),
            (b'{"history": [0], "domain": "Books"}', 422, "unknown domain"),
            (b'{"history": [0], "domain": "A", "k": 0}', 422, "k must be"),
        ):
            reply = httpx.post(f"{base}/recommend", content=body)
            assert reply.status_code == status and message in reply.json()["error"], (body, reply.text)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_connections_accepted_from_the_workers_socket_have_nagle_off():
    """The socket ``cdsr serve --workers N`` shares: asyncio sets TCP_NODELAY on what it
    accepts (a response's body then goes out without waiting for the client's delayed ACK)."""
    import asyncio
    import socket

    from cdsr_pipeline.serve import listening_socket

    sock = listening_socket("127.0.0.1", 0)

    async def accepted_options() -> list[int]:
        seen: list[int] = []
        accepted = asyncio.Event()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                seen.append(transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                accepted.set()

        server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
        async with server:
            _, writer = await asyncio.open_connection(*sock.getsockname()[:2])
            await asyncio.wait_for(accepted.wait(), 10)
            writer.close()
        return seen

    assert asyncio.run(accepted_options()) == [1]


def test_serve_with_two_worker_processes_answers_like_the_library(first_run):
    import asyncio
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    from cdsr_pipeline.cli import find_run, main
    from cdsr_pipeline.model.recommend import load_run, recommend

    storage, _ = first_run
    assert main(["serve", "--storage", str(storage), "--workers", "0"]) == 2  # one line, no server
    run = load_run(find_run(storage, "TEMA-LLM"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "cdsr_pipeline.cli", "serve", "--storage", str(storage), "--run", "TEMA-LLM"]
    server = subprocess.Popen(
        [*command, "--port", str(port), "--workers", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # two processes import torch and load the run
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"{base}/health").json()["run"] == "TEMA-LLM":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.5)
        histories = [[0, 1, 15], [2, 14], [3], [13, 4, 5], [6, 7], [8]]
        expected = [[r.to_dict() for r in recommend(run, h, "B", 5)] for h in histories]

        async def concurrent():
            async with httpx.AsyncClient(base_url=base) as client:
                replies = await asyncio.gather(
                    *(client.post("/recommend", json={"history": h, "domain": "B", "k": 5}) for h in histories)
                )
            return [reply.json()["recommendations"] for reply in replies]

        for got, want in zip(asyncio.run(concurrent()), expected, strict=True):
            assert [r["item_id"] for r in got] == [r["item_id"] for r in want]
            assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], rel=1e-5)
        assert httpx.post(f"{base}/recommend", content=b"{not json").status_code == 400
    finally:
        os.killpg(server.pid, signal.SIGINT)  # the supervisor stops its workers
        output = server.communicate(timeout=60)[0]
    assert output.count("Started server process") == 2, output
    assert server.returncode == 0, output
