"""Each model is its own asset that depends only on what it reads.

SASRec trains from ``cdsr_sequences`` alone (no LLM or encoder asset materialized);
a reader of an undeclared asset is refused; the report collects whichever model
assets exist and names the missing ones.
"""

from __future__ import annotations

import dagster as dg
import pytest

from cdsr_pipeline.assets._stage import DeclaredInputs, UndeclaredInputError
from cdsr_pipeline.assets.training import TRAINING_ASSETS
from cdsr_pipeline.definitions import defs
from cdsr_pipeline.resources import (
    DatasetSource,
    ImageEncoderResource,
    LLMResource,
    StorageResource,
    TextEncoderResource,
)
from cdsr_pipeline.storage import ArtifactStore

LLM_ASSETS = {"llm_augmented_text", "item_llm_text_embeddings", "domain_tag_vocabularies", "item_tag_scores", "item_tag_matrix"}
TRAINING = {"epochs": 2, "patience": 2, "hidden_dim": 16, "batch_size": 64, "num_negatives": 50, "num_threads": 1}


def _deps(asset: str) -> set[str]:
    graph = defs.resolve_asset_graph()
    return {key.path[-1] for key in graph.get(dg.AssetKey(asset)).parent_keys}


def test_each_model_depends_only_on_what_it_reads():
    for baseline in ("sasrec_model", "gru4rec_model", "popularity_model"):
        assert _deps(baseline) == {"cdsr_sequences"}
    assert _deps("llm_emf_title_model") == {"cdsr_sequences", "item_text_embeddings", "item_image_embeddings"}
    assert _deps("llm_emf_model") == {
        "cdsr_sequences", "item_text_embeddings", "item_image_embeddings", "item_llm_text_embeddings", "llm_augmented_text"
    }
    assert _deps("tema_llm_model") == _deps("llm_emf_model") | {"item_tag_matrix", "domain_tag_vocabularies"}
    assert _deps("tema_llm_title_model") == _deps("llm_emf_title_model") | {"item_tag_matrix", "domain_tag_vocabularies"}
    assert _deps("evaluation_report") == {spec.name for spec in TRAINING_ASSETS} | {"cdsr_sequences"}


def test_undeclared_input_is_refused(tmp_path):
    inputs = DeclaredInputs(ArtifactStore(tmp_path), ["cdsr_sequences"], "sasrec_model")
    with pytest.raises(UndeclaredInputError, match="sasrec_model reads 'item_tag_matrix'"):
        inputs.manifest("item_tag_matrix")
    with pytest.raises(UndeclaredInputError):
        inputs.path("llm_augmented_text", "augmented_text.parquet")


@pytest.mark.slow
def test_sasrec_trains_without_any_llm_stage_and_report_lists_missing(tmp_path):
    storage = tmp_path / "storage"
    resources = {
        "storage": StorageResource(root=str(storage)),
        "source": DatasetSource(),
        # required by the definitions' other assets; none of them is selected, so none loads a model
        "text_encoder": TextEncoderResource(device="cpu"),
        "image_encoder": ImageEncoderResource(device="cpu"),
        "llm": LLMResource(),
    }
    selection = ["raw_interactions", "cdsr_sequences", "sasrec_model", "popularity_model", "evaluation_report"]
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        resources=resources,
        run_config={
            "ops": {
                "sasrec_model": {"config": TRAINING},
                # the runs an asset adds (another seed, the single-domain users) train from the spec they extend
                "popularity_model": {"config": TRAINING | {"extra_seeds": [1], "also_with_single_domain_users": True}},
            }
        },
        selection=selection,
    )
    assert result.success
    built = {e.asset_key.path[-1] for e in result.get_asset_materialization_events()}
    assert built == set(selection)
    artifacts = storage / "artifacts"
    assert not any((artifacts / name).exists() for name in LLM_ASSETS | {"item_text_embeddings"})
    meta = {e.asset_key.path[-1]: e.materialization.metadata for e in result.get_asset_materialization_events()}
    # the model's metrics are plain numbers Dagster can plot over materializations
    assert isinstance(meta["sasrec_model"]["test MRR Grocery and Gourmet Food (full)"].value, float)
    assert meta["sasrec_model"]["epochs run"].value == 2
    assert sorted(meta["popularity_model"]["runs"].value) == [
        "Popularity", "Popularity (seed 1)", "Popularity + single-domain users", "Popularity + single-domain users (seed 1)"
    ]
    report = (artifacts / "evaluation_report" / "report.md").read_text()
    assert "SASRec" in report and "Popularity" in report
    assert "`tema_llm_model`" in report and "Not in this report" in report
    # the demo sample draws 50 negatives among about 200 Food items: not degenerate; 999 would be
    assert "Degenerate sampled protocol" not in report


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nosuch", "no asset named nosuch"),
        ("a b", "is not a valid selection"),
        ("sasrec_model,nosuch", "no asset named nosuch"),
        ("*sasrec_model,nosuch+", "no asset named nosuch"),
    ],
)
def test_bad_selection_is_one_clear_line(text, message, capsys, tmp_path):
    from cdsr_pipeline.cli import main

    assert main(["run", "--select", text, "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "'a,b' or 'key:a or key:b'" in err and len(err.splitlines()) == 1


def test_comma_list_selects_those_assets():
    from cdsr_pipeline.cli import resolve_selection

    keys = resolve_selection("sasrec_model,gru4rec_model", defs.resolve_asset_graph())
    assert sorted(k.path[-1] for k in keys) == ["gru4rec_model", "sasrec_model"]
    # parts with Dagster's upstream/downstream marks: the union of each part's selection
    keys = resolve_selection("*item_tag_matrix,item_text_embeddings", defs.resolve_asset_graph())
    assert sorted(k.path[-1] for k in keys) == [
        "cdsr_sequences", "domain_tag_vocabularies", "item_tag_matrix", "item_tag_scores", "item_text_embeddings",
        "raw_interactions",
    ]


def test_recommend_without_a_trained_run_is_one_clear_line(capsys, tmp_path):
    from cdsr_pipeline.cli import main

    assert main(["recommend", "--storage", str(tmp_path), "--history", "1,2", "--domain", "A"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no trained run under") and len(err.strip().splitlines()) == 1


def test_single_domain_users_add_a_separately_named_run():
    from cdsr_pipeline.assets.training import TrainingSettings
    from cdsr_pipeline.model.runs import plan_runs

    configs = TrainingSettings(also_with_single_domain_users=True).run_configs(plan_runs(["sasrec"]))
    assert [(c.name, c.train_user_domains) for c in configs] == [
        ("SASRec", ("both",)),
        ("SASRec + single-domain users", ("both", "A", "B")),
    ]
    assert configs[0].identity_hash() != configs[1].identity_hash()
    assert len(TrainingSettings().run_configs(plan_runs(["sasrec"]))) == 1
    assert [c.patience for c in configs] == [10, 10]
    settings = TrainingSettings(patience=20, also_with_single_domain_users=True, single_domain_users_patience=3, extra_seeds=[1])
    assert [(c.name, c.patience) for c in settings.run_configs(plan_runs(["sasrec"]))] == [
        ("SASRec", 20),
        ("SASRec + single-domain users", 3),
        ("SASRec (seed 1)", 20),
        ("SASRec + single-domain users (seed 1)", 3),
    ]


def test_every_run_of_an_asset_comes_from_its_spec():
    from cdsr_pipeline.assets.training import TrainingSettings
    from cdsr_pipeline.model.runs import plan_runs, spec_of

    specs = plan_runs(["tema_llm", "sasrec"], ["tema_table5"])
    configs = TrainingSettings(extra_seeds=[1, 2], also_with_single_domain_users=True).run_configs(specs)
    assert len(configs) == len(specs) * 2 * 3
    for config in configs:
        spec = spec_of(config, specs)
        assert config.model == spec.model and config.ablation_group == spec.ablation_group
        assert config.name.startswith(spec.name)


def test_extra_seeds_add_runs_named_by_their_seed():
    from cdsr_pipeline.assets.training import TrainingSettings
    from cdsr_pipeline.model.runs import plan_runs

    configs = TrainingSettings(extra_seeds=[0, 1, 2, 1]).run_configs(plan_runs(["sasrec"]))
    assert [(c.name, c.seed) for c in configs] == [("SASRec", 0), ("SASRec (seed 1)", 1), ("SASRec (seed 2)", 2)]
    assert len({c.identity_hash() for c in configs}) == 3


def test_ablation_rows_that_differ_by_an_absent_tower_share_one_config():
    from cdsr_pipeline.model.config import PRESETS
    from cdsr_pipeline.model.runs import ablation_rows

    with_images = ablation_rows("llm_emf_table4")
    assert len({m for m in with_images.values()}) == 6
    without = ablation_rows("llm_emf_table4", frozenset({"img"}))
    assert without["original"] == without["+visual"] == with_images["+visual"]
    assert without["+text"] == without["+text+visual"] == PRESETS["llm_emf_title"]  # reuses that model asset's run
    assert without["+text+llm"] == without["full (LLM-EMF)"] == PRESETS["llm_emf"]
    # only the modalities may differ: TEMA Table IV's single-view rows keep multi_attention off
    assert ablation_rows("tema_table4", frozenset({"img", "llm"})) == ablation_rows("tema_table4")


def test_llm_emf_table4_without_images_trains_three_runs_and_reports_six_rows(tmp_path):
    import dataclasses

    from model_synthetic import write_synthetic_features, write_synthetic_sequences

    from cdsr_pipeline.model import TrainConfig
    from cdsr_pipeline.model.data import FeatureInputs
    from cdsr_pipeline.model.runs import plan_runs, train_runs
    from cdsr_pipeline.report import _ablation_table

    sequences = write_synthetic_sequences(tmp_path / "sequences", names=("Food", "Kitchen"))
    features = write_synthetic_features(tmp_path / "features", num_items=50)  # no image features
    specs = plan_runs([], ["llm_emf_table4"], absent=frozenset({"img"}))
    configs = [
        TrainConfig(
            model=dataclasses.replace(s.model, hidden_dim=16), name=s.name, ablation_group=s.ablation_group,
            epochs=1, num_negatives=20, num_threads=1, progress=False,
        )
        for s in specs
    ]

    def inputs_of(config):
        used = set(config.model.modalities)
        return FeatureInputs(tex=features.tex if "tex" in used else None, llm=features.llm if "llm" in used else None), {"seq": "1"}

    messages = []
    results = train_runs(configs, inputs_of, sequences, tmp_path / "cache", tmp_path / "out", messages.append)
    assert sum("its files are reused" in m for m in messages) == 3
    by_name = {r.name.removeprefix("LLM-EMF T4: "): r for r in results}
    for row, twin in (("+visual", "original"), ("+text+visual", "+text"), ("full (LLM-EMF)", "+text+llm")):
        assert by_name[row].metrics["best_checkpoint"] == by_name[twin].metrics["best_checkpoint"]
    _, rows = _ablation_table(results, {"A": "Food", "B": "Kitchen"})
    variants = [row[0] for row in rows]
    assert variants[3] == "LLM-EMF T4: +visual (the same run as LLM-EMF T4: original)"
    assert sum("the same run as" in v for v in variants) == 3


def test_ablation_table_rows_follow_the_papers_order(tmp_path):
    from types import SimpleNamespace

    from cdsr_pipeline.report import _in_table_order

    names = ["TEMA T4: +LLM matching", "TEMA T4: +multi-attention (TEMA-LLM)", "TEMA T4: original (seed 1)",
             "TEMA T4: original", "TEMA T4: +tag embedding (static tags)"]
    rows = [SimpleNamespace(name=name) for name in names]  # the folders' alphabetical order
    assert [r.name for r in _in_table_order(rows, "tema_table4")] == [
        "TEMA T4: original", "TEMA T4: original (seed 1)", "TEMA T4: +tag embedding (static tags)",
        "TEMA T4: +LLM matching", "TEMA T4: +multi-attention (TEMA-LLM)",
    ]
