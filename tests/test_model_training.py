"""End-to-end training on a small synthetic dataset: learning, determinism, resume,
checkpoints, report."""

import dataclasses
import json
import platform
import statistics
from collections import Counter

import numpy as np
import polars as pl
import pytest
import torch

from model_synthetic import write_synthetic_features, write_synthetic_sequences

from cdsr_pipeline.model import PRESETS, TrainConfig, TrainResult, load_model, train_model
from cdsr_pipeline.model.data import Domains, load_sequences
from cdsr_pipeline.model.evaluate import EvaluationSplit, split_ranks, summarize_ranks
from cdsr_pipeline.model.trainer import BEST_CHECKPOINT, TEST_RANKS_FILE, keep_freed_memory_for_reuse, load_checkpoint
from cdsr_pipeline.model.metrics import summarize
from cdsr_pipeline.model.runs import run_folder, train_runs
from cdsr_pipeline.report import (
    FREQUENCY_BUCKETS,
    frequency_breakdown,
    paired_comparisons,
    papers_results_for,
    protocol_label,
    target_frequencies,
    write_report,
)


@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """The runs below ask for one thread (fast and stable on a shared machine); give
    the rest of the test session its thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _config(preset: str, **changes) -> TrainConfig:
    model = dataclasses.replace(PRESETS[preset], hidden_dim=32)
    defaults = dict(model=model, name=preset, epochs=4, patience=50, num_negatives=20, num_threads=1, progress=False)
    return TrainConfig(**{**defaults, **changes})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    sequences = write_synthetic_sequences(root / "sequences", names=("Food", "Kitchen"))
    features = write_synthetic_features(root / "features", num_items=50)
    return sequences, features


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    sequences, features = dataset
    root = tmp_path_factory.mktemp("runs")
    return {
        "tema": train_model(sequences, features, _config("tema_llm", epochs=6, ablation_group="demo"), root / "tema"),
        "popularity": train_model(sequences, features, _config("popularity"), root / "popularity"),
    }


def _mean_full_mrr(result: TrainResult) -> float:
    test = result.metrics["best_checkpoint"]["test"]
    return (test["A"]["full"]["mrr"] + test["B"]["full"]["mrr"]) / 2


def test_training_learns_the_synthetic_pattern(runs):
    tema, popularity = runs["tema"], runs["popularity"]
    # random ranking over 20 / 30 items has MRR ~0.18 / 0.13
    assert _mean_full_mrr(popularity) < 0.3
    assert _mean_full_mrr(tema) > 2 * _mean_full_mrr(popularity)
    losses = tema.epochs()["train_loss"].to_list()
    assert losses[-1] < losses[0]


def test_run_folder_holds_every_output(runs):
    tema = runs["tema"]
    for name in ("config.json", "metrics.json", "epochs.parquet", "best.pt", "last.pt", TEST_RANKS_FILE):
        assert (tema.out_dir / name).is_file()
    epochs = tema.epochs()
    assert epochs["epoch"].to_list() == [1, 2, 3, 4, 5, 6]
    assert {"train_loss", "epoch_seconds", "valid_sampled_A_mrr", "test_full_B_ndcg_10", "valid_sampled_mean_mrr"} <= set(epochs.columns)
    metrics = tema.metrics
    assert metrics["patience"] == 50 and metrics["epochs_run"] == 6 and not metrics["stopped_early"]
    per_domain = metrics["per_domain_best"]["sampled"]["A"]
    best_row = epochs.filter(pl.col("epoch") == per_domain["epoch"]).row(0, named=True)
    assert per_domain["test"]["mrr"] == best_row["test_sampled_A_mrr"]
    assert best_row["valid_sampled_A_mrr"] == epochs["valid_sampled_A_mrr"].max()
    assert TrainResult.load(tema.out_dir).metrics == metrics


def _comparable(result: TrainResult) -> pl.DataFrame:
    return result.epochs().drop(["train_seconds", "eval_seconds", "epoch_seconds"])


def test_same_inputs_and_config_give_the_same_metrics_and_a_resumed_run_matches(dataset, tmp_path):
    sequences, features = dataset
    config = _config("llm_emf", epochs=3)
    straight = train_model(sequences, features, config, tmp_path / "straight")
    again = train_model(sequences, features, config, tmp_path / "again")
    assert _comparable(straight).equals(_comparable(again))

    # "crash" after epoch 1, then restart on the same folder
    train_model(sequences, features, dataclasses.replace(config, epochs=1), tmp_path / "resumed")
    resumed = train_model(sequences, features, config, tmp_path / "resumed")
    assert _comparable(resumed).equals(_comparable(straight))
    assert resumed.metrics["best_checkpoint"] == straight.metrics["best_checkpoint"]


def test_a_folder_of_another_configuration_or_other_inputs_is_not_resumed(dataset, tmp_path):
    sequences, features = dataset
    train_model(sequences, features, _config("sasrec", epochs=1), tmp_path / "run")
    with pytest.raises(ValueError, match="different configuration or inputs"):
        train_model(sequences, features, _config("sasrec", epochs=1, seed=1), tmp_path / "run")
    with pytest.raises(ValueError, match="different configuration or inputs"):
        train_model(sequences, dataclasses.replace(features, tags=None), _config("sasrec", epochs=1), tmp_path / "run")


def test_a_finished_run_under_another_name_is_reused_and_another_tag_file_is_not(dataset, tmp_path):
    sequences, features = dataset
    cache, versions = tmp_path / "cache", {"cdsr_sequences": "v1"}
    other_tags = tmp_path / "other-tags.parquet"
    other_tags.write_bytes(features.tags.read_bytes())  # another variant of one asset: same data version
    variant = dataclasses.replace(features, tags=other_tags)
    inputs = {"TEMA-LLM": features, "TEMA T4: full": features, "TEMA T4: other tags": variant}
    base = _config("tema_llm", epochs=1)
    configs = [dataclasses.replace(base, name=name) for name in inputs]
    said = []
    results = train_runs(configs, lambda run: (inputs[run.name], versions), sequences, cache, tmp_path / "out", said.append)

    first, same, other = (run_folder(cache, config, versions) for config in configs)
    assert (first / "last.pt").stat().st_ino == (same / "last.pt").stat().st_ino  # hard-linked, not trained again
    assert (other / "last.pt").stat().st_ino != (first / "last.pt").stat().st_ino
    assert [line for line in said if "reused" in line] == [
        f"TEMA T4: full: the same config and inputs as the finished run in {first.name}; its files are reused"
    ]
    assert _comparable(results[1]).equals(_comparable(results[0]))
    assert results[1].metrics["best_checkpoint"] == results[0].metrics["best_checkpoint"]
    assert json.loads((tmp_path / "out/runs/tema-t4-full/config.json").read_text())["train_config"]["name"] == "TEMA T4: full"


def test_early_stopping_counts_patience_epochs(dataset, tmp_path):
    sequences, features = dataset
    result = train_model(sequences, features, _config("gru4rec", epochs=30, patience=1, learning_rate=0.0), tmp_path / "run")
    assert result.metrics["stopped_early"]
    assert result.metrics["epochs_run"] == 2  # epoch 2 does not improve on epoch 1 with a zero learning rate


def test_best_checkpoint_loads_weights_only_and_reproduces_its_metrics(runs, dataset):
    sequences, features = dataset
    tema = runs["tema"]
    checkpoint = torch.load(tema.out_dir / BEST_CHECKPOINT, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == tema.metrics["best_checkpoint"]["epoch"]
    assert load_checkpoint(tema.out_dir / "last.pt")["early_stopping"]["epoch"] == 6
    model = load_model(tema.out_dir, sequences, features)
    domains = Domains.load(sequences)
    test = EvaluationSplit.create("test", load_sequences(sequences, "test", max_len=50), domains, 20, 0)
    recomputed = summarize_ranks(split_ranks(model, test, domains, torch.device("cpu"), 256))
    recorded = tema.metrics["best_checkpoint"]["test"]
    for domain in ("A", "B"):
        for protocol in ("sampled", "full"):
            assert recomputed[domain][protocol] == pytest.approx(recorded[domain][protocol])


def test_every_model_sees_the_same_negatives(runs):
    assert runs["tema"].metrics["negatives"] == runs["popularity"].metrics["negatives"]


def test_report_labels_the_papers_numbers_and_draws_curves(runs, tmp_path):
    paths = write_report([runs["tema"], runs["popularity"].out_dir], tmp_path / "report")
    markdown = paths.markdown.read_text()
    assert "Different data: not comparable" in markdown
    assert "synthetic-cycles" in markdown and "TEMA-LLM" in markdown
    assert "patience 50" in markdown
    assert "## Ablations" in markdown and "### demo" in markdown
    selected = runs["tema"].metrics["best_checkpoint"]["valid"]
    valid = (selected["A"]["sampled"]["mrr"] + selected["B"]["sampled"]["mrr"]) / 2
    ablation_rows = [line for line in markdown.split("### demo", 1)[1].splitlines() if line.startswith("| tema_llm |")]
    assert len(ablation_rows) == 1 and f"| {100 * valid:.2f} (sampled) |" in ablation_rows[0]
    assert "999 sampled negatives" in markdown and "full ranking" in markdown
    assert paths.html.read_text().startswith("<!DOCTYPE html>")
    assert [p.name for p in paths.figures] == ["curves_tema-llm.png"]
    assert all(p.stat().st_size > 1000 for p in paths.figures)
    assert "curves_tema-llm.png" in paths.html.read_text()
    # metrics.json holds the curves as numbers: every epoch's loss and validation MRRs
    published = {run["name"]: run for run in json.loads((tmp_path / "report" / "metrics.json").read_text())["runs"]}
    curve, epochs = published[runs["tema"].name]["curve"], runs["tema"].epochs()
    assert curve["epoch"] == epochs["epoch"].to_list() and curve["train_loss"] == epochs["train_loss"].to_list()
    assert curve["valid_full_B_mrr"] == epochs["valid_full_B_mrr"].to_list()
    assert published[runs["popularity"].name]["curve"] == {}


def test_the_report_breaks_test_mrr_down_by_the_targets_training_frequency(runs, dataset, tmp_path):
    sequences, _ = dataset
    paths = write_report([runs["tema"], runs["popularity"]], tmp_path / "report", sequences_dir=sequences)
    breakdown = json.loads((tmp_path / "report" / "metrics.json").read_text())["by_target_frequency"]
    frequencies = target_frequencies(sequences, 50)
    train = pl.read_parquet(sequences / "train.parquet").filter(pl.col("user_domains") == "both")
    counts = Counter(item for sequence in train["sequence"].to_list() for item in sequence)
    targets = load_sequences(sequences, "test", max_len=50).last_targets
    assert frequencies.tolist() == [counts.get(int(t), 0) for t in targets]

    ranks = pl.read_parquet(runs["tema"].out_dir / TEST_RANKS_FILE)
    assert sum(breakdown["rows"]["A"]) + sum(breakdown["rows"]["B"]) == ranks.height
    assert "## By the target item's training frequency" in paths.markdown.read_text()

    # every synthetic item is frequent: spread the rows over every bucket to check the grouping
    spread = np.arange(len(targets)) % 25
    breakdown = frequency_breakdown([runs["tema"]], spread)
    kitchen = ranks.filter(pl.col("domain") == "B")
    found = spread[kitchen["row"].to_numpy()]
    for bucket, (low, high) in enumerate(FREQUENCY_BUCKETS):
        inside = (found >= low) & (found <= (found.max() if high is None else high))
        assert inside.any() and breakdown["rows"]["B"][bucket] == int(inside.sum())
        for protocol in ("sampled", "full"):
            expected = float(np.mean(1.0 / kitchen[f"rank_{protocol}"].to_numpy()[inside]))
            assert breakdown["runs"]["tema_llm"][protocol]["B"][bucket] == pytest.approx(expected)


def test_papers_numbers_are_found_by_domain_words():
    assert papers_results_for(["Food", "Kitchen"]) is papers_results_for(["Grocery and Gourmet Food", "Home and Kitchen"])
    assert papers_results_for(["Movies and TV", "Books"])["TEMA-LLM"][0][0] == 6.41
    assert papers_results_for(["Kitchen", "Food"]) is None  # domain order matters: A is Food
    assert papers_results_for(["Tea", "Pots"]) is None


def test_sampled_protocol_label_says_when_it_is_not_the_papers():
    assert protocol_label("sampled", 999) == "999 sampled negatives (papers' protocol)"
    assert protocol_label("sampled", 100) == "100 sampled negatives (the papers use 999)"
    assert protocol_label("full", 100) == "full ranking over the target domain"


def test_freed_memory_is_kept_for_reuse_where_the_c_library_is_glibc():
    assert keep_freed_memory_for_reuse() is (platform.libc_ver()[0] == "glibc")
    big = torch.ones(16 * 2**20)  # 64 MB: from the heap now, not a fresh mmap; still usable and freed
    assert big.sum().item() == 16 * 2**20
    del big


def test_a_larger_patience_extends_a_stopped_run_exactly(dataset, tmp_path):
    sequences, features = dataset
    config = _config("gru4rec", epochs=12, patience=2, learning_rate=0.2)
    straight = train_model(sequences, features, config, tmp_path / "straight")
    stopped = train_model(sequences, features, dataclasses.replace(config, patience=1), tmp_path / "extended")
    assert stopped.metrics["stopped_early"] and stopped.metrics["epochs_run"] < straight.metrics["epochs_run"]
    extended = train_model(sequences, features, config, tmp_path / "extended")  # same folder, larger patience
    assert _comparable(extended).equals(_comparable(straight))
    assert extended.metrics["best_checkpoint"] == straight.metrics["best_checkpoint"]
    # a smaller patience than the recorded run went past is refused, not silently mislabelled
    with pytest.raises(ValueError, match="a smaller patience needs a fresh run folder"):
        train_model(sequences, features, dataclasses.replace(config, patience=1), tmp_path / "straight")


def test_a_run_from_before_patience_left_the_identity_still_resumes(dataset, tmp_path):
    from cdsr_pipeline.model.trainer import LAST_CHECKPOINT, inputs_digest
    from cdsr_pipeline.storage import stable_hash

    sequences, features = dataset
    config = _config("gru4rec", epochs=2, precision="fp32")  # runs of then were fp32
    train_model(sequences, features, dataclasses.replace(config, epochs=1), tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run" / LAST_CHECKPOINT)
    checkpoint["identity"] = stable_hash(  # what the trainer wrote before: patience in the identity
        {"config": config.legacy_identity_hash(), "inputs": inputs_digest(sequences, features)}
    )
    torch.save(checkpoint, tmp_path / "run" / LAST_CHECKPOINT)
    resumed = train_model(sequences, features, config, tmp_path / "run")
    assert resumed.metrics["epochs_run"] == 2
    assert _comparable(resumed).equals(_comparable(train_model(sequences, features, config, tmp_path / "fresh")))


@pytest.mark.parametrize(
    ("vendor", "flags", "auto", "bf16"),
    [
        ("GenuineIntel", "fma avx2", "fp32", None),  # no bf16 arithmetic: bf16 refused
        ("AuthenticAMD", "fma avx2", "fp32", None),
        ("GenuineIntel", "avx2 avx512f avx512_bf16", "fp32", "bf16"),  # native, but slower than fp32 without AMX
        ("GenuineIntel", "avx2 avx512f avx512_bf16 amx_tile amx_bf16", "bf16", "bf16"),
        ("AuthenticAMD", "avx2 avx512f avx512_bf16", "bf16", "bf16"),
    ],
)
def test_precision_auto_means_bf16_only_where_it_is_faster_than_fp32(monkeypatch, vendor, flags, auto, bf16):
    from cdsr_pipeline import hardware

    monkeypatch.setattr(hardware, "_cpuinfo", {"vendor_id": vendor, "flags": flags}.get)
    cpu = torch.device("cpu")
    assert hardware.resolve_precision("fp32", cpu) == "fp32"
    assert hardware.resolve_precision("auto", cpu) == auto
    if bf16 is None:
        with pytest.raises(ValueError, match="no native bf16"):
            hardware.resolve_precision("bf16", cpu)
    else:
        assert hardware.resolve_precision("bf16", cpu) == bf16
    with pytest.raises(ValueError, match="precision must be one of"):
        TrainConfig(precision="fp16")


def test_bf16_training_is_its_own_run_and_learns_like_fp32(dataset, tmp_path, monkeypatch):
    from cdsr_pipeline import hardware
    from cdsr_pipeline.model import trainer

    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)  # bf16 is emulated where it is not native
    sequences, features = dataset
    config = _config("tema_llm", epochs=4)
    fp32 = train_model(sequences, features, dataclasses.replace(config, precision="fp32"), tmp_path / "fp32")
    bf16 = train_model(sequences, features, dataclasses.replace(config, precision="bf16"), tmp_path / "bf16")
    assert (fp32.metrics["precision"], bf16.metrics["precision"]) == ("fp32", "bf16")
    assert fp32.metrics["identity"] != bf16.metrics["identity"]
    # the fp32 run keeps the identity it had before precision was configurable
    assert trainer.run_identity(dataclasses.replace(config, precision="fp32"), "fp32") == config.identity_hash()
    # an fp32 run's folder is not resumed as bf16
    with pytest.raises(ValueError, match="different configuration"):
        train_model(sequences, features, dataclasses.replace(config, precision="bf16"), tmp_path / "fp32")
    gaps = [
        abs(a - b)
        for a, b in zip(fp32.epochs()["valid_full_mean_mrr"].to_list(), bf16.epochs()["valid_full_mean_mrr"].to_list())
    ]
    assert max(gaps) < 0.05, gaps
    assert bf16.epochs()["train_loss"].to_list()[-1] < bf16.epochs()["train_loss"].to_list()[0]
    # the speed-up is labelled in the results tables; the fp32 run is not
    report = write_report([fp32, bf16], tmp_path / "report").markdown.read_text()
    assert "| tema_llm (bf16) |" in report and "| tema_llm |" in report and "scripts/precision_table.py" in report


def test_the_report_gives_mean_and_spread_over_seeds(dataset, tmp_path):
    sequences, features = dataset
    seeded = [
        train_model(sequences, features, _config("sasrec", epochs=2, seed=seed, name=name), tmp_path / f"seed{seed}")
        for seed, name in ((0, "SASRec"), (1, "SASRec (seed 1)"), (2, "SASRec (seed 2)"))
    ]
    lone = train_model(sequences, features, _config("popularity"), tmp_path / "popularity")
    paths = write_report([*seeded, lone], tmp_path / "report")
    text = paths.markdown.read_text()
    assert "Mean and spread over seeds" in text
    values = [100 * r.metrics["best_checkpoint"]["test"]["A"]["sampled"]["mrr"] for r in seeded]
    mean, spread = sum(values) / 3, statistics.stdev(values)
    assert f"| SASRec (bf16) | 3 | {mean:.2f} ± {spread:.2f} |" in text or f"| SASRec | 3 | {mean:.2f} ± {spread:.2f} |" in text
    assert "| popularity | 1 |" in text  # a run without seeds: its one value
    # the runs table names each run's seed and the CPU capability it trained with
    capability = torch.backends.cpu.get_cpu_capability()
    runs_table = text.split("## Runs", 1)[1].split("\n\n", 2)[1]
    for seed, name in ((0, "SASRec"), (1, "SASRec (seed 1)"), (2, "SASRec (seed 2)")):
        row = next(line for line in runs_table.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith(f", seed {seed} |") and f" {capability}), " in row


def test_the_best_checkpoints_test_ranks_give_its_metrics_and_pair_up_against_sasrec(runs, dataset, tmp_path):
    sequences, features = dataset
    tema = runs["tema"]
    ranks = pl.read_parquet(tema.out_dir / TEST_RANKS_FILE)
    recorded = tema.metrics["best_checkpoint"]["test"]
    for domain in ("A", "B"):
        rows = ranks.filter(pl.col("domain") == domain)
        assert rows.height > 0 and rows["row"].n_unique() == rows.height
        for protocol in ("sampled", "full"):
            assert summarize(rows[f"rank_{protocol}"].to_numpy()) == pytest.approx(recorded[domain][protocol])
    assert ranks["row"].n_unique() == ranks.height == len(load_sequences(sequences, "test", max_len=50).last_targets)
    sasrec = train_model(sequences, features, _config("sasrec", epochs=2, name="SASRec"), tmp_path / "sasrec")
    paired = paired_comparisons([sasrec, tema, runs["popularity"]])
    assert set(paired) == {tema.name, runs["popularity"].name}  # every run but the reference
    entry = paired[tema.name]["full"]["A"]
    mrr_tema, mrr_sasrec = recorded["A"]["full"]["mrr"], sasrec.metrics["best_checkpoint"]["test"]["A"]["full"]["mrr"]
    assert entry["difference"] == pytest.approx(mrr_tema - mrr_sasrec)
    assert entry["ratio"] == pytest.approx(mrr_tema / mrr_sasrec)
    assert entry["low"] <= entry["difference"] <= entry["high"]
    text = write_report([sasrec, tema], tmp_path / "report").markdown.read_text()
    assert "Against SASRec, paired over the test rows" in text
    assert f"| {tema.name} | {entry['ratio']:.2f}x |" in text
    assert paired_comparisons([tema]) == {}  # no reference: no comparison
