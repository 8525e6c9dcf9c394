"""Which runs a training request stands for: models, ablation tables, their tag matrices.

A run is a model config plus the tag matrix it reads. Tag matrices are named by
variant (the ``item_tag_matrix`` asset writes every one): ``default`` (the configured
selection and representation), ``static`` (keyword-matched tags, TEMA Table IV) and
``<selection>-<representation>`` (TEMA Tables V and VI).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..llm.tag_matrix import REPRESENTATIONS, SELECTIONS, STATIC_VARIANT, variant_name
from .config import ABLATIONS, PRESETS, ModelConfig

MODELS = ("tema_llm", "llm_emf", "llm_emf_title", "tema_llm_title", "tema_llm_fused", "sasrec", "gru4rec", "popularity")
MODEL_NAMES = {
    "tema_llm": "TEMA-LLM",
    "llm_emf": "LLM-EMF",
    "llm_emf_title": "LLM-EMF (title text only)",
    "tema_llm_title": "TEMA-LLM (title text only)",
    "tema_llm_fused": "TEMA-LLM (Eq. 9 fused)",
    "sasrec": "SASRec",
    "gru4rec": "GRU4Rec",
    "popularity": "Popularity",
}
ABLATION_GROUPS = ("llm_emf_table4", "tema_table4", "tema_table5", "tema_table6")


@dataclass(frozen=True)
class RunSpec:
    name: str
    model: ModelConfig
    tags: str | None  # tag-matrix variant the run reads; None: the model has no tag tower
    ablation_group: str | None = None


def _tags_for(model: ModelConfig, variant: str) -> str | None:
    return variant if "tag" in model.modalities and model.architecture == "sequential" else None


def plan_runs(
    models: list[str] | tuple[str, ...],
    ablations: list[str] | tuple[str, ...] = (),
    *,
    selection: str = "hybrid",
    representation: str = "weighted",
) -> list[RunSpec]:
    """The runs of the requested models and ablation tables, in order, without duplicate names.

    ``selection`` and ``representation`` are the default tag matrix's: Table V varies
    the representation at that selection, Table VI the selection at that representation.
    """
    unknown = [m for m in models if m not in MODELS] + [a for a in ablations if a not in ABLATION_GROUPS]
    if unknown:
        raise ValueError(f"unknown models/ablations {unknown}; models: {MODELS}; ablations: {ABLATION_GROUPS}")
    runs = [RunSpec(MODEL_NAMES[m], PRESETS[m], _tags_for(PRESETS[m], "default")) for m in models]
    for group in ablations:
        if group == "llm_emf_table4":
            rows = [RunSpec(f"LLM-EMF T4: {label}", model, None, group) for label, model in ABLATIONS[group].items()]
        elif group == "tema_table4":
            rows = []
            for label, model in ABLATIONS[group].items():
                variant = STATIC_VARIANT if "static" in label else "default"
                rows.append(RunSpec(f"TEMA T4: {label}", model, _tags_for(model, variant), group))
        elif group == "tema_table5":
            rows = [
                RunSpec(f"TEMA T5: {rep}", PRESETS["tema_llm"], variant_name(selection, rep), group) for rep in REPRESENTATIONS
            ]
        else:  # tema_table6
            rows = [
                RunSpec(f"TEMA T6: {sel}", PRESETS["tema_llm"], variant_name(sel, representation), group) for sel in SELECTIONS
            ]
        runs.extend(rows)
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"runs requested twice: {duplicates}")
    return runs
