"""Model and training configuration: plain frozen dataclasses, named presets, ablations.

Everything a run depends on besides its input tables is a field here, so a config
serialises to JSON (:func:`config_to_dict`) and back (:func:`train_config_from_dict`);
its hash (with the inputs' digest) identifies a run for resuming.

Interpretation decisions (docs/SPEC.md "Model" leaves these open; see also
:mod:`cdsr_pipeline.model.sequential`):

- **tex(+llm) is one modality.** SPEC counts 3 modalities for LLM-EMF (9 vectors) and
  4 for TEMA-LLM (12 vectors), so the title text (``tex``) and the LLM-augmented text
  (``llm``) feed ONE text tower. Its frozen item matrix is the concatenation of the
  two L2-normalised embeddings (an item missing one of them has zeros in that half),
  re-normalised: nothing is averaged away, and the tower's query can weight the two
  halves as it learns. ``"llm"`` in ``modalities`` is the LLM-EMF Table 4
  "LLM-enhanced" switch; ``"tex"`` the title text.
- **alpha** is ``(alpha_id, alpha_img, alpha_text)``; the tag tower gets
  ``1 - sum(alpha)``. The weights of the towers actually built (enabled AND with
  features for the dataset) are renormalised to sum to 1 (LLM-EMF without tags: id
  0.4, img 0.2, text 0.2 -> 0.5, 0.25, 0.25).
- **multi_attention=False** (TEMA Table IV "Multi-Attn" off) means one encoder per
  modality over the merged sequence S^{X+Y} only: loss ``-log P^{X+Y}``, score
  ``P^{X+Y}``. The separate S^X / S^Y encoders are what the papers' "multiple
  attention" adds.
- **sequence_weighting**: the papers write loss and score for target domain X:
  weight 1 on S^X, lambda1 on S^Y, lambda2 on S^{X+Y}. ``"target_relative"`` (default,
  LLM-EMF §3.5 "Let D be the target domain") gives weight 1 to the target domain's own
  sequence and lambda1 to the other domain's; ``"as_written"`` keeps 1 on S^X and
  lambda1 on S^Y whatever the target domain.
- **Baselines** are configs of the same sequential model: SASRec and GRU4Rec are one
  ID tower over the merged sequence, dot-product scores (their papers' head; the
  temperature is not used), full softmax over the target domain's items.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from ..settings import setting
from ..storage import stable_hash

MODALITIES = ("id", "img", "tex", "llm", "tag")
"""Feature sources. ``tex`` and ``llm`` feed the same text tower (see module docstring)."""

Architecture = Literal["sequential", "popularity"]
Fusion = Literal["late", "early"]
Encoder = Literal["attention", "gru"]
Scoring = Literal["cosine", "dot"]
SequenceWeighting = Literal["target_relative", "as_written"]
Protocol = Literal["sampled", "full"]
Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """One member of the model family (or a baseline).

    Attributes:
        architecture: ``sequential`` (LLM-EMF / TEMA-LLM / SASRec / GRU4Rec) or
            ``popularity`` (training counts within the target domain; no training).
        modalities: feature sources to use, a subset of :data:`MODALITIES`. A source
            without features for the dataset is left out with a logged note.
        fusion: ``late``: one tower per modality, probabilities fused with alpha
            (TEMA Eq. 12-13, LLM-EMF Eq. 8). ``early``: TEMA Eq. 9, one item embedding
            ``MLP(e_id + e_img + e_text + e_tag)`` (concatenation, 2 layers, GELU) and
            one tower.
        multi_attention: three sequences S^X, S^Y, S^{X+Y} per tower (True) or the
            merged sequence only (False).
        encoder: ``attention`` (causal multi-head self-attention with positional
            embedding) or ``gru`` (GRU4Rec).
        scoring: ``cosine`` (cos(h, e_i) / temperature, the papers) or ``dot``
            (h . e_i, the SASRec / GRU4Rec head).
        alpha: fusion weights of the id, img and text towers; tag gets the rest.
        lambda1, lambda2: weights of the other domain's and the merged sequence.
        sequence_weighting: see the module docstring.
        temperature: tau of the cosine scores.
        hidden_dim: E_id size, encoder width, tag embedding size d_t (paper: 256).
        num_layers, num_heads: self-attention blocks and heads per encoder.
        dropout: on embeddings, attention weights and residual branches (paper: 0.3).
        loss_negatives: None = full softmax over the target domain's items in the
            loss (default, the papers). K = sampled-softmax speed-up: the normaliser
            of each tower's softmax is estimated as exp(s_target) + (|D|/K) sum_k
            exp(s_k) over K items drawn uniformly from D, shared by the batch's
            examples of that domain (kept on the full softmax's scale, which the
            alpha-fusion of probabilities needs). Evaluation always uses the full
            softmax; report its validation MRR beside a full-softmax run's.
    """

    architecture: Architecture = "sequential"
    modalities: tuple[str, ...] = ("id", "img", "tex", "llm", "tag")
    fusion: Fusion = "late"
    multi_attention: bool = True
    encoder: Encoder = "attention"
    scoring: Scoring = "cosine"
    alpha: tuple[float, float, float] = setting((0.4, 0.2, 0.2), "Fusion weights of id, img, text; tag gets the rest.")
    lambda1: float = setting(0.3, "Weight of the other domain's sequence.")
    lambda2: float = setting(0.1, "Weight of the merged sequence.")
    sequence_weighting: SequenceWeighting = setting("target_relative", "target_relative | as_written.")
    temperature: float = setting(0.1, "τ of the cosine scores.")
    hidden_dim: int = setting(256, "ID embedding, encoder width and tag embedding size.")
    num_layers: int = 1
    num_heads: int = 2
    dropout: float = setting(0.3, "On embeddings, attention weights and residual branches.")
    loss_negatives: int | None = setting(None, "Empty: full softmax; K: sampled-softmax speed-up.")

    def __post_init__(self) -> None:
        unknown = set(self.modalities) - set(MODALITIES)
        if unknown:
            raise ValueError(f"unknown modalities {sorted(unknown)}; choose from {MODALITIES}")
        if self.architecture == "sequential" and not self.modalities:
            raise ValueError("a sequential model needs at least one modality")
        if len(self.alpha) != 3 or any(a < 0 for a in self.alpha) or sum(self.alpha) > 1 + 1e-9:
            raise ValueError(f"alpha must be three non-negative weights summing to <= 1, got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.hidden_dim % self.num_heads:
            raise ValueError("hidden_dim must be divisible by num_heads")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.loss_negatives is not None and self.loss_negatives < 1:
            raise ValueError("loss_negatives must be None (full softmax) or >= 1")

    @property
    def tower_weights(self) -> dict[str, float]:
        """Un-normalised fusion weight of each tower (before dropping absent ones)."""
        a_id, a_img, a_text = self.alpha
        return {"id": a_id, "img": a_img, "text": a_text, "tag": max(0.0, 1.0 - a_id - a_img - a_text)}


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Defaults are the papers' settings where they give one.

    Attributes:
        model: the model (a preset from :data:`PRESETS` or a variant of one).
        name: label of the run in reports (empty: the architecture's name).
        ablation_group: runs sharing a group form one ablation table in the report.
        max_len: sequences are cut to their last ``max_len`` input positions.
        train_user_domains: which training sequences to use by ``user_domains``:
            ``("both",)`` = cross-domain users (default), add ``"A"``/``"B"`` for the
            single-domain users of releases that ship them.
        batch_size: sequences per step (every position of a sequence is an example).
        epochs: maximum number of epochs.
        learning_rate, weight_decay: Adam.
        patience: epochs without improvement of the validation MRR (mean of the two
            domains, ``selection_protocol``) before stopping. State it with results:
            attention models on LLMCDSR plateau ~20 epochs before improving.
        selection_protocol: protocol of the validation MRR used for early stopping.
        num_negatives: sampled negatives per evaluation row (protocol "sampled").
        negatives_seed: seed of the evaluation negatives, independent of ``seed`` so
            every model and training seed sees the same candidates.
        seed: model initialisation, batch order and dropout.
        eval_batch_size: evaluation rows per forward pass.
        device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:n]``.
        num_threads: CPU threads for torch (None: all cores of this machine).
        precision: arithmetic of the training step's matrix products. ``bf16``:
            autocast to bfloat16 (weights, optimizer state, softmax normalisers, the
            loss and every evaluation stay fp32); ``fp32``; ``auto`` (default): bf16
            where the device multiplies bf16 faster than fp32 (CUDA with bf16, CPUs
            with AMX, AMD CPUs with AVX-512 BF16), fp32 elsewhere (Intel's AVX-512
            BF16 without AMX is native but slower). The precision used is part of the
            run's identity (:func:`cdsr_pipeline.model.trainer.resolve_precision`).
        progress: tqdm progress bars.
        processes: data-parallel training processes (torchrun + DistributedDataParallel,
            :mod:`cdsr_pipeline.model.distributed`): each takes a share of every batch,
            so the epochs are those of one process up to the order of floating-point
            sums (and the dropout masks). 1: this process alone. Part of the identity
            when above 1.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    name: str = ""
    ablation_group: str | None = None
    max_len: int = setting(50, "Sequences are cut to their last max_len positions.")
    train_user_domains: tuple[str, ...] = setting(("both",), "Training sequences by users' domains: both (cross-domain), A, B.")
    batch_size: int = setting(256, "Sequences per step (every position is an example).")
    epochs: int = setting(100, "Maximum epochs.")
    learning_rate: float = setting(1e-3, "Adam.")
    weight_decay: float = setting(0.0, "Adam.")
    patience: int = setting(10, "Epochs without a better validation MRR before stopping.")
    selection_protocol: Protocol = "sampled"
    num_negatives: int = setting(999, "Negatives per row of the sampled evaluation protocol.")
    negatives_seed: int = setting(0, "Seed of the evaluation negatives (same for every model).")
    seed: int = setting(0, "Initialisation, batch order and dropout.")
    eval_batch_size: int = 256
    device: str = setting("auto", "auto (CUDA when present), cpu or cuda.")
    num_threads: int | None = setting(None, "torch CPU threads; empty: torch's default.")
    precision: Precision = setting(
        "auto", "auto (bf16 where the device multiplies bf16 natively, else fp32), fp32 or bf16: the training step's matrix products."
    )
    progress: bool = True
    processes: int = setting(
        1, "Data-parallel processes (torchrun, DistributedDataParallel; gloo on CPU, nccl on CUDA), each with a share of every batch."
    )

    def __post_init__(self) -> None:
        if self.max_len < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("max_len, batch_size and eval_batch_size must be >= 1")
        if self.epochs < 0 or self.patience < 1:
            raise ValueError("epochs must be >= 0 and patience >= 1")
        if not set(self.train_user_domains) <= {"both", "A", "B"} or not self.train_user_domains:
            raise ValueError(
                f"train_user_domains must be a non-empty subset of both/A/B, got {self.train_user_domains}"
            )
        if self.num_negatives < 1:
            raise ValueError("num_negatives must be >= 1")
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def label(self) -> str:
        return self.name or self.model.architecture

    def identity_hash(self) -> str:
        """Hash of everything that changes the trained weights or the metrics.

        ``epochs`` and ``patience`` (a resumed run may be extended: the epochs it ran
        are those of any run with larger limits), ``device``, ``num_threads``,
        ``progress``, ``name`` and ``ablation_group`` are left out, and so is
        ``precision``: ``auto`` means different arithmetic on different devices, so
        the trainer adds the precision it resolved to (bf16 only, which keeps the
        identity of every fp32 run from before precision was configurable).
        """
        fields = config_to_dict(self)
        for key in ("epochs", "patience", "device", "num_threads", "precision", "progress", "name", "ablation_group", "processes"):
            fields.pop(key)
        return stable_hash(fields)

    def legacy_identity_hash(self) -> str:
        """The identity of runs trained before ``patience`` became extendable (it was
        part of it): such run folders and checkpoints are still found and resumed."""
        fields = config_to_dict(self)
        for key in ("epochs", "device", "num_threads", "precision", "progress", "name", "ablation_group", "processes"):
            fields.pop(key)
        return stable_hash(fields)


def config_to_dict(config: TrainConfig | ModelConfig) -> dict[str, Any]:
    """Plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    data = dict(data)
    data["modalities"] = tuple(data["modalities"])
    data["alpha"] = tuple(data["alpha"])
    return ModelConfig(**data)


def train_config_from_dict(data: dict[str, Any]) -> TrainConfig:
    data = dict(data)
    data["model"] = model_config_from_dict(data["model"])
    data["train_user_domains"] = tuple(data["train_user_domains"])
    return TrainConfig(**data)


PRESETS: dict[str, ModelConfig] = {
    # LLM-EMF: id + image + text (title + LLM-augmented), three sequences, no tags.
    "llm_emf": ModelConfig(modalities=("id", "img", "tex", "llm")),
    # LLM-EMF without the LLM-enhanced text (Table 4's switch off): title text only.
    "llm_emf_title": ModelConfig(modalities=("id", "img", "tex")),
    # TEMA-LLM: LLM-EMF + LLM-matched tag tower.
    "tema_llm": ModelConfig(modalities=("id", "img", "tex", "llm", "tag")),
    # TEMA-LLM without the LLM-enhanced text: llm_emf_title + the tag tower, so the
    # tags' contribution is measurable before the augmentation exists.
    "tema_llm_title": ModelConfig(modalities=("id", "img", "tex", "tag")),
    # TEMA-LLM with Eq. 9: one MLP-fused item embedding instead of separate towers.
    "tema_llm_fused": ModelConfig(modalities=("id", "img", "tex", "llm", "tag"), fusion="early"),
    "sasrec": ModelConfig(
        modalities=("id",), multi_attention=False, scoring="dot", num_layers=2
    ),
    "gru4rec": ModelConfig(modalities=("id",), multi_attention=False, encoder="gru", scoring="dot"),
    "popularity": ModelConfig(architecture="popularity", modalities=()),
}

ABLATIONS: dict[str, dict[str, ModelConfig]] = {
    # LLM-EMF Table 4 (rows in the paper's order). "Visual fusion" rows need image
    # features; on releases without images they reduce to their image-less row.
    "llm_emf_table4": {
        "original": ModelConfig(modalities=("id",)),
        "+text": ModelConfig(modalities=("id", "tex")),
        "+text+llm": ModelConfig(modalities=("id", "tex", "llm")),
        "+visual": ModelConfig(modalities=("id", "img")),
        "+text+visual": ModelConfig(modalities=("id", "img", "tex")),
        "full (LLM-EMF)": PRESETS["llm_emf"],
    },
    # TEMA Table IV. "Original framework" = TEMA-LLM without tags and without the
    # multi-attention (merged sequence only). "+tag embedding" uses the STATIC
    # (keyword-matched) tag matrix and "+LLM matching" the LLM-matched one: same model
    # config, the tag matrix is the run's input (FeatureInputs.tags).
    "tema_table4": {
        "original": ModelConfig(modalities=("id", "img", "tex", "llm"), multi_attention=False),
        "+tag embedding (static tags)": ModelConfig(modalities=MODALITIES, multi_attention=False),
        "+LLM matching": ModelConfig(modalities=MODALITIES, multi_attention=False),
        "+multi-attention (TEMA-LLM)": PRESETS["tema_llm"],
    },
    # TEMA Tables V (one-hot / unweighted / weighted multi-hot) and VI (top-R /
    # threshold / hybrid) are the tema_llm preset trained on different tag matrices.
}
