"""Config declared once: the Dagster config classes are made from the library dataclasses
(assets/_config.py), with the same defaults, and the fingerprints of unchanged settings
stay what they were, so existing caches and trained runs stay valid."""

from __future__ import annotations

import dataclasses

import pytest

from cdsr_pipeline.assets.features import IMAGE_FETCH_SETTINGS, ImageFetchSettings
from cdsr_pipeline.assets.ingest import SequencesSettings
from cdsr_pipeline.assets.llm import AugmentationSettings, TagMatrixSettings, TagScoringSettings, VocabularySettings
from cdsr_pipeline.assets.training import MODEL_SETTINGS, TrainingSettings
from cdsr_pipeline.data.sequences import FilterConfig
from cdsr_pipeline.features.images import ImageFetchConfig
from cdsr_pipeline.features.tag_matrix import TagMatrixConfig
from cdsr_pipeline.llm import AugmentationConfig, TagScoringConfig, VocabularyConfig
from cdsr_pipeline.model.config import PRESETS, ModelConfig, TrainConfig, config_to_dict
from cdsr_pipeline.model.runs import RunSpec
from cdsr_pipeline.storage import stable_hash

# stable_hash of each config class's default dump, the part of every asset fingerprint
# that config gives. A change here invalidates every cached artifact of that asset (and,
# for TrainingSettings, nothing of the trained runs, which have their own identity):
# make it on purpose and say so in the commit.
DEFAULT_DUMP_HASHES = {
    "ImageFetchSettings": "37b13b073dc15ccd4b4aee4310147e329a2496c4a0e9f1c23a130cb07029ccbc",
    "SequencesSettings": "3d6f186fd8ac3024e1791b217267756859a9df979fe0cb82d454964cdd935a13",
    "AugmentationSettings": "81eb66bdf73fca9dc7c8883f0d9b38ff9f392b777366daaf6aefd3d709724549",
    "VocabularySettings": "6a2304c4fca14c809e25e9fd286d2be6455689ec4608e4d848de427c2050ab78",
    "TagScoringSettings": "cc9773630256dbfa262d4a101cf73af3a348fe988f63c79cb76f006d3e20bfdc",
    "TagMatrixSettings": "afdc69e17ace1fd15b6a6cde7731e8ba56326739d42e2f5d46670375b740af2c",
    "TrainingSettings": "31ab29b6e23da7e88a271ae3eeb145d33a1e9e16aaa54048cae49d7d5f2054f2",
}
SETTINGS = {
    "SequencesSettings": (SequencesSettings, FilterConfig),
    "AugmentationSettings": (AugmentationSettings, AugmentationConfig),
    "VocabularySettings": (VocabularySettings, VocabularyConfig),
    "TagScoringSettings": (TagScoringSettings, TagScoringConfig),
    "TagMatrixSettings": (TagMatrixSettings, TagMatrixConfig),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_a_stage_config_has_the_library_fields_and_defaults(name: str) -> None:
    settings, library = SETTINGS[name]
    assert settings().model_dump() == config_to_dict(library())


def test_image_fetch_settings_are_a_subset_of_the_fetcher_config() -> None:
    library = dataclasses.asdict(ImageFetchConfig())
    assert ImageFetchSettings().model_dump() == {name: library[name] for name in IMAGE_FETCH_SETTINGS}
    assert ImageFetchConfig(**ImageFetchSettings(retries=5).model_dump()).retries == 5


def test_training_settings_are_train_config_and_the_model_settings() -> None:
    dump = TrainingSettings().model_dump()
    train = config_to_dict(TrainConfig())
    model = config_to_dict(ModelConfig())
    for key, value in dump.items():
        if key in MODEL_SETTINGS:
            assert value == model[key], key
        elif key not in ("also_with_single_domain_users", "single_domain_users_patience", "extra_seeds"):
            assert value == train[key], key
    described = [name for name, field in TrainingSettings.model_fields.items() if not field.description]
    assert described == [], f"settings without a launchpad description: {described}"


def test_a_run_from_the_settings_is_the_train_config_written_by_hand() -> None:
    spec = RunSpec("TEMA-LLM", PRESETS["tema_llm"], "default")
    settings = TrainingSettings(hidden_dim=64, alpha=[0.3, 0.3, 0.2], patience=7, train_user_domains=["both", "A"], seed=3)
    by_hand = TrainConfig(
        model=dataclasses.replace(PRESETS["tema_llm"], hidden_dim=64, alpha=(0.3, 0.3, 0.2)),
        name="TEMA-LLM",
        patience=7,
        train_user_domains=("both", "A"),
        seed=3,
    )
    assert settings.train_config(spec) == by_hand
    assert settings.train_config(spec).identity_hash() == by_hand.identity_hash()
    # a baseline keeps its own definition: the model settings apply to sequential models only
    popularity = RunSpec("Popularity", PRESETS["popularity"], None)
    assert settings.train_config(popularity).model == PRESETS["popularity"]


@pytest.mark.parametrize("name", sorted(DEFAULT_DUMP_HASHES))
def test_unchanged_settings_keep_their_fingerprint(name: str) -> None:
    settings = {"TrainingSettings": TrainingSettings, "ImageFetchSettings": ImageFetchSettings}.get(name) or SETTINGS[name][0]
    assert stable_hash(settings().model_dump()) == DEFAULT_DUMP_HASHES[name]


# The resources' fingerprints (part of the fingerprint of every stage that uses them) at
# the values the hand-written resources gave: the generated ones keep every cache valid.
RESOURCE_FINGERPRINTS = {
    "text encoder": "7b9fe972a7e7f57c27cb78066c0862caf2bfa1e0eb8c801983927365e74fe984",
    "image encoder": "ab42fbf453283c7cfcfb267fee4b2602b4e9dac1f979fd956e3a971456c42796",
    "text encoder bf16": "f257a692e52738dc8a1333b8facf6bb44ba2c38aefe05ecea592bc1e6b0e3bc5",
    "one ollama server": "08ffbc68bc56ad98408dcf97925474aa5e37a38e36f01ecfd36a4ad84728ca6c",
    "two ollama servers": "e74e98fbf8d1a4a816c291cc3864eca976584dba9e115672cf46c9892fe4dec4",
}


def test_the_resources_take_their_fields_from_the_library_and_keep_their_fingerprints(tmp_path, monkeypatch) -> None:
    from cdsr_pipeline import hardware
    from cdsr_pipeline.features.encoders import EncoderSpec
    from cdsr_pipeline.llm import EmbeddedConfig, OllamaConfig
    from cdsr_pipeline.resources import ImageEncoderResource, LLMResource, TextEncoderResource
    from cdsr_pipeline.storage import ArtifactStore

    assert TextEncoderResource().spec() == EncoderSpec(backend="sentence_transformers")
    assert ImageEncoderResource().spec() == EncoderSpec()
    llm = LLMResource()
    for name in ("n_threads", "generation_batch", "precision"):
        assert getattr(llm, name) == getattr(EmbeddedConfig(), name), name
        assert LLMResource.model_fields[name].description.startswith("embedded: ")
    for name in ("host", "timeout_s", "max_retries", "max_concurrency", "think"):
        assert getattr(llm, name) == getattr(OllamaConfig(), name), name
        assert LLMResource.model_fields[name].description.startswith("ollama: ")
    ollama = LLMResource(backend="ollama", host="http://a:1", max_concurrency=2).llm_config(ArtifactStore(tmp_path))
    assert (ollama.ollama.host, ollama.ollama.max_concurrency, ollama.ollama.model) == ("http://a:1", 2, OllamaConfig.model)

    store = ArtifactStore(tmp_path)
    # a bf16 encoder is refused where the CPU has no native bf16 (AVX2-only machines):
    # its fingerprint is a property of the config, pinned on any CPU
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    fingerprints = {
        "text encoder": TextEncoderResource().fingerprint(store),
        "image encoder": ImageEncoderResource().fingerprint(store),
        "text encoder bf16": TextEncoderResource(precision="bf16").fingerprint(store),
        "one ollama server": LLMResource(backend="ollama", host="http://a:1").fingerprint(store),
        "two ollama servers": LLMResource(backend="ollama", host="http://a:1,http://b:2", think=False).fingerprint(store),
    }
    assert fingerprints == RESOURCE_FINGERPRINTS
