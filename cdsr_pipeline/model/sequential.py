"""The LLM-EMF / TEMA-LLM model family (and SASRec / GRU4Rec as its ID-only configs).

For each modality tower m and each sequence view s in {X, Y, X+Y} an encoder gives
h_m^s (at every example position in training, at the last position in evaluation).
For a target domain D:

    P_m^s(i)  = softmax_{i in D}( score(h_m^s, e_m[i]) )
                score = cos(h, e) / tau  (papers)   or   h . e  (SASRec/GRU4Rec head)
    P^s(i)    = sum_m alpha_m P_m^s(i)                    (alpha renormalised, see config)
    loss      = -sum_s w_D(s) log P^s(target)             (mean over examples)
    score(i)  = sum_s w_D(s) P^s(i)

with w_D = (1, lambda1, lambda2) on (own domain, other domain, merged) for
``sequence_weighting="target_relative"``; see :mod:`cdsr_pipeline.model.config`.
A view whose prefix is empty (no X item yet) predicts the uniform distribution
1/|D|: a constant in loss and score.

Towers:

- ``id``: learnable E_id [items, hidden] (shared by inputs and candidates).
- ``tag``: learnable E_tag [tags, hidden]; e_tag(v) = w_v . E_tag (TEMA Eq. 3).
- ``img``/``text``: frozen matrices. Inputs are projected to ``hidden``; the encoder
  output z is projected back, h = W z, into the feature space and compared with
  the frozen vectors: cos(h, e_i) = z . (W^T e_i/|e_i|) / |W z|. The candidate
  matrix ``(E/|E|) W`` is formed once per step, so scoring costs ``hidden`` per item
  instead of the feature dimension (exactly the same scores).
- ``fusion="early"`` (TEMA Eq. 9): one tower whose item embedding is
  MLP(e_id + e_img + e_text + e_tag) (concatenation; 2 layers, GELU); candidates are
  all items of D through the MLP each step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Recommender
from .config import MODALITIES, ModelConfig
from .data import VIEWS, Batch, Domains, ItemFeatures, TagFeature
from .layers import CausalSelfAttentionEncoder, GRUEncoder, needs_shift, chunked_logsumexp

EMBEDDING_INIT_STD = 0.02


class _IdEmbedding(nn.Module):
    def __init__(self, num_items: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(num_items + 1, dim, padding_idx=num_items)
        nn.init.normal_(self.embedding.weight, std=EMBEDDING_INIT_STD)
        with torch.no_grad():
            self.embedding.weight[num_items].zero_()

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.embedding(items)


class _TagEmbedding(nn.Module):
    """e_tag(v) = sum_i w_v[i] E_tag[i]; items are padded to the largest tag count."""

    def __init__(self, tags: TagFeature, num_items: int, dim: int):
        super().__init__()
        self.tags = nn.Parameter(torch.empty(tags.num_tags, dim).normal_(std=EMBEDDING_INIT_STD))
        counts = tags.offsets[1:] - tags.offsets[:-1]
        width = max(1, int(counts.max()))
        rows = torch.repeat_interleave(torch.arange(num_items), counts)
        cols = torch.arange(tags.tag_ids.numel()) - torch.repeat_interleave(tags.offsets[:-1], counts)
        ids = torch.zeros(num_items + 1, width, dtype=torch.long)  # last row: padding item
        weights = torch.zeros(num_items + 1, width)
        ids[rows, cols] = tags.tag_ids
        weights[rows, cols] = tags.weights
        self.register_buffer("item_tags", ids, persistent=False)
        self.register_buffer("item_weights", weights, persistent=False)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        flat = items.reshape(-1)
        pooled = F.embedding_bag(
            self.item_tags[flat], self.tags, per_sample_weights=self.item_weights[flat], mode="sum"
        )
        return pooled.view(*items.shape, -1)


class _FrozenEmbedding(nn.Module):
    """Row lookup in a frozen, L2-normalised matrix (zero rows for absent items)."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        padded = torch.cat([F.normalize(matrix, dim=1), matrix.new_zeros(1, matrix.shape[1])])
        self.register_buffer("matrix", padded, persistent=False)

    @property
    def dim(self) -> int:
        return self.matrix.shape[1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.matrix[items]


class _Tower(nn.Module):
    """One modality: item inputs for the encoders, queries and candidates for scoring.

    ``queries(z) @ candidates(D).T`` is the score matrix before the softmax.
    """

    def __init__(self, cosine: bool, temperature: float):
        super().__init__()
        self.cosine = cosine
        self.scale = 1.0 / temperature if cosine else 1.0
        # cosine logits lie in [-scale, scale]: a known max for the normaliser, as
        # long as exp(-2 * scale) stays representable in fp32
        self.max_logit = self.scale if cosine and 2 * self.scale <= 80 else None

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def candidates(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError


class _LearnedTower(_Tower):
    """Item vectors from a learnable module (ID, tag, or the Eq. 9 MLP)."""

    def __init__(self, item_embedding: nn.Module, cosine: bool, temperature: float):
        super().__init__(cosine, temperature)
        self.item_embedding = item_embedding

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.item_embedding(items)

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        return (F.normalize(z, dim=-1) if self.cosine else z) * self.scale

    def candidates(self, start: int, stop: int) -> torch.Tensor:
        device = next(self.item_embedding.parameters()).device
        vectors = self.item_embedding(torch.arange(start, stop, device=device))
        return F.normalize(vectors, dim=-1) if self.cosine else vectors


class _FrozenTower(_Tower):
    """Frozen features: input projection in, h = W z back into the feature space."""

    def __init__(self, frozen: _FrozenEmbedding, dim: int, cosine: bool, temperature: float):
        super().__init__(cosine, temperature)
        self.frozen = frozen
        self.input_projection = nn.Linear(frozen.dim, dim)
        self.output_projection = nn.Linear(dim, frozen.dim, bias=False)

    def embed(self, items: torch.Tensor) -> torch.Tensor:
        return self.input_projection(self.frozen(items))

    def queries(self, z: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            z = z / self.output_projection(z).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return z * self.scale

    def candidates(self, start: int, stop: int) -> torch.Tensor:
        return self.frozen.matrix[start:stop] @ self.output_projection.weight


class _EarlyFusion(nn.Module):
    """TEMA Eq. 9: MLP(e_id (+) e_img (+) e_text (+) e_tag), 2 layers with GELU."""

    def __init__(self, parts: nn.ModuleDict, in_dim: int, dim: int):
        super().__init__()
        self.parts = parts
        self.mlp = nn.Sequential(nn.Linear(in_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.mlp(torch.cat([part(items) for part in self.parts.values()], dim=-1))


class SequentialRecommender(Recommender):
    """Modality towers x sequence views, fused as described in the module docstring."""

    def __init__(self, config: ModelConfig, domains: Domains, features: ItemFeatures, max_len: int):
        super().__init__()
        self.config = config
        self.domains = domains
        self.notes = list(features.notes)
        available = features.available()
        enabled = set(config.modalities) & available
        dim = config.hidden_dim
        cosine = config.scoring == "cosine"

        parts: dict[str, tuple[nn.Module, int]] = {}
        if "id" in enabled:
            parts["id"] = (_IdEmbedding(domains.num_items, dim), dim)
        if "img" in enabled:
            frozen = _FrozenEmbedding(features.dense["img"].matrix)
            parts["img"] = (frozen, frozen.dim)
        text_sources = [name for name in ("tex", "llm") if name in enabled]
        if text_sources:
            frozen = _FrozenEmbedding(
                torch.cat([F.normalize(features.dense[name].matrix, dim=1) for name in text_sources], dim=1)
            )
            parts["text"] = (frozen, frozen.dim)
        if "tag" in enabled:
            parts["tag"] = (_TagEmbedding(features.tags, domains.num_items, dim), dim)
        if not parts:
            raise ValueError(f"none of the modalities {config.modalities} has features for this dataset")

        if config.fusion == "early":
            modules = nn.ModuleDict({name: module for name, (module, _) in parts.items()})
            module = _EarlyFusion(modules, sum(width for _, width in parts.values()), dim)
            towers = {"fused": _LearnedTower(module, cosine, config.temperature)}
            weights = {"fused": 1.0}
            self.notes.append(f"early fusion (Eq. 9) of {', '.join(parts)}; alpha not used")
        else:
            towers = {}
            for name, (module, _) in parts.items():
                if isinstance(module, _FrozenEmbedding):
                    towers[name] = _FrozenTower(module, dim, cosine, config.temperature)
                else:
                    towers[name] = _LearnedTower(module, cosine, config.temperature)
            raw = {name: config.tower_weights[name] for name in towers}
            total = sum(raw.values())
            if total <= 0:
                raise ValueError(f"the fusion weights of the towers {list(towers)} sum to 0; check alpha")
            weights = {name: w / total for name, w in raw.items()}
            if len(towers) > 1 and not math.isclose(total, 1.0):
                self.notes.append(
                    "fusion weights renormalised over "
                    + ", ".join(f"{name} {w:.3f}" for name, w in weights.items())
                )
        if text_sources and config.fusion == "late":
            self.notes.append(f"text tower from {' + '.join(text_sources)}")

        self.towers = nn.ModuleDict(towers)
        self.views = VIEWS if config.multi_attention else ("XY",)
        self.encoders = nn.ModuleDict(
            {name: nn.ModuleDict({view: self._encoder(config, max_len) for view in self.views}) for name in towers}
        )
        self.register_buffer("log_weights", torch.tensor([math.log(weights[n]) for n in towers]), persistent=False)
        self.register_buffer("view_weights", self._view_weights(config), persistent=False)
        # (tower, domain) -> candidate matrix, only inside fixed_weights()
        self._candidate_cache: dict[tuple[str, int], torch.Tensor] | None = None
        self.summary = {
            "sources": [name for name in MODALITIES if name in enabled],
            "towers": {name: round(w, 6) for name, w in weights.items()},
            "views": list(self.views),
            "view_weights": {
                domains.names[d]: dict(zip(self.views, self.view_weights[d].tolist())) for d in (0, 1)
            },
            "scoring": config.scoring,
        }

    @staticmethod
    def _encoder(config: ModelConfig, max_len: int) -> nn.Module:
        if config.encoder == "gru":
            return GRUEncoder(config.hidden_dim, config.num_layers, config.dropout)
        return CausalSelfAttentionEncoder(
            config.hidden_dim, config.num_layers, config.num_heads, config.dropout, max_len
        )

    def _view_weights(self, config: ModelConfig) -> torch.Tensor:
        """[2 target domains, views] sequence weights of loss and score."""
        if not config.multi_attention:
            return torch.ones(2, 1)
        own, other, merged = 1.0, config.lambda1, config.lambda2
        if config.sequence_weighting == "as_written":
            return torch.tensor([[own, other, merged], [own, other, merged]])
        return torch.tensor([[own, other, merged], [other, own, merged]])

    # -- shared forward --------------------------------------------------------

    @contextlib.contextmanager
    def fixed_weights(self) -> Iterator[None]:
        """Each tower's candidate matrix of each domain is computed once for the block
        instead of once per batch (the same values: the weights are fixed in it). What
        makes serving and full-sort evaluation cheap, most of all for early fusion,
        whose candidates are every item of D through the MLP."""
        if torch.is_grad_enabled():
            raise RuntimeError("fixed_weights() is for inference: call it under torch.no_grad()")
        outer, self._candidate_cache = self._candidate_cache, {}
        try:
            yield
        finally:
            self._candidate_cache = outer

    def _candidates(self, name: str, domain: int) -> torch.Tensor:
        return self.towers[name].candidates(*self.domains.item_range(domain))

    def _candidates_by_column(self, name: str, domain: int) -> torch.Tensor:
        """[hidden, N_D]: a tower's candidate matrix transposed, contiguous (computed once
        inside fixed_weights()), so that inference's product ``queries @ it`` is a plain
        row-major product that writes its [Q, N_D] logits in place. On the 2-core Xeon
        (2026-12-07, Kitchen's [27,637 x 256]) it beat both other layouts at 1, 3, 12 and
        96 queries: 1.4 / 2.0 / 10.2 ms at 3 / 12 / 96 queries against 3.0 / 2.9 / 13.1 for
        ``candidates @ queries.T`` (then a [Q, N_D] copy) and 1.3 / 3.2 / 10.9 for
        ``queries @ candidates.T``. On the AMD EPYC (2026-12-03) ``candidates @ queries.T``
        had run ~2x faster than ``queries @ candidates.T`` with few queries; this layout is
        not yet measured there (``benchmarks/serve.py`` shows it)."""
        cache = self._candidate_cache
        if cache is None or torch.is_grad_enabled():
            return self._candidates(name, domain).t().contiguous()
        if (name, domain) not in cache:
            cache[name, domain] = self._candidates(name, domain).t().contiguous()
        return cache[name, domain]

    def _encode(self, batch: Batch) -> dict[str, dict[str, torch.Tensor]]:
        """tower -> view -> encoder outputs [B, L_view, hidden]."""
        return {
            name: {view: self.encoders[name][view](tower.embed(batch.items[view])) for view in self.views}
            for name, tower in self.towers.items()
        }

    def _queries(self, name: str, batch: Batch, domains: Sequence[int]) -> list[torch.Tensor]:
        """One tower's queries at inference for the examples of each target domain of
        ``domains`` ([Q_d, hidden] each, all views concatenated in ``example_query``'s
        order). One encoder pass per view serves every domain asked (a served round holds
        both), and computes its last block only at the positions read
        (:meth:`CausalSelfAttentionEncoder.forward_at`)."""
        tower = self.towers[name]
        parts: list[list[torch.Tensor]] = [[] for _ in domains]
        for view in self.views:
            counts = [batch.domains[d].query_rows[view].numel() for d in domains]
            if not sum(counts):
                continue
            rows = torch.cat([batch.domains[d].query_rows[view] for d in domains])
            positions = torch.cat([batch.domains[d].query_positions[view] for d in domains])
            queries = tower.queries(self.encoders[name][view].forward_at(tower.embed(batch.items[view]), rows, positions))
            for own, part in zip(parts, queries.split(counts), strict=True):
                if part.shape[0]:
                    own.append(part)
        return [torch.cat(own) if own else self.log_weights.new_zeros(0, self.config.hidden_dim) for own in parts]

    def _domain_log_probs(self, name: str, outputs: dict[str, torch.Tensor], batch: Batch, domain: int) -> torch.Tensor:
        """Training: log P_m^s(target) of one tower for one target domain, [views, E].
        Empty prefixes get the uniform -log N_D."""
        tower = self.towers[name]
        examples = batch.domains[domain]
        queries = torch.cat(
            [
                tower.queries(outputs[view][examples.query_rows[view], examples.query_positions[view]])
                for view in self.views
            ]
        )
        candidates = self._candidates(name, domain)
        index = examples.example_query.clamp(min=0)
        empty = examples.example_query < 0
        uniform = -math.log(self.domains.sizes[domain])
        # fp32 also under bf16 autocast: the target logit is subtracted from an fp32 normaliser
        target_logits = (queries[index].float() * candidates[examples.targets].float()).sum(-1)
        size = candidates.shape[0]
        negatives = self.config.loss_negatives
        if negatives is None or negatives >= size:
            normaliser = chunked_logsumexp(queries, candidates, tower.max_logit)[index]
        else:
            sampled = torch.randint(size, (negatives,), device=candidates.device)
            rest = chunked_logsumexp(queries, candidates[sampled], tower.max_logit) + math.log(size / negatives)
            normaliser = torch.logaddexp(target_logits, rest[index])
        return (target_logits - normaliser).masked_fill(empty, uniform)

    def _domain_probs(self, k: int, batch: Batch, domain: int, queries: torch.Tensor, by_view: bool = False) -> torch.Tensor:
        """Inference: tower k's share of the score of every item of the domain, [E, N_D]:
        alpha_m sum_s w_D(s) P_m^s(i), the view's uniform 1/N_D where its prefix is empty;
        with ``by_view``, each view's term on its own, [V, E, N_D] (they sum to it).

        Each query's softmax normaliser, view weight and alpha are folded into one row
        scale of exp(logits), and each example's views are summed into its row (or each
        view's into its own slot) in one pass (``index_add_``): two passes over the
        [Q, N_D] logits after their product."""
        name = list(self.towers)[k]
        tower = self.towers[name]
        examples = batch.domains[domain]
        by_column = self._candidates_by_column(name, domain)
        size = by_column.shape[1]
        weights = self.view_weights[domain] * self.log_weights[k].exp()  # [V]
        index = examples.example_query  # [V, E]
        present = index >= 0
        logits = (queries @ by_column).float()
        if needs_shift(tower.max_logit, size):  # else exp() of bounded (cosine) logits cannot overflow
            shift = logits.amax(dim=1, keepdim=True) if tower.max_logit is None else logits.new_full((1, 1), tower.max_logit)
            logits.sub_(shift)
        probs = logits.exp_()
        counts = torch.tensor([examples.query_rows[view].numel() for view in self.views], device=probs.device)
        probs.mul_((weights.repeat_interleave(counts) / probs.sum(dim=1))[:, None])
        empty = (~present) * weights[:, None]  # [V, E]: the weight of each empty view's uniform share
        if by_view:  # slot v * E + e of a [V * E, N_D] block
            uniform, slots = empty / size, torch.arange(index.numel(), device=index.device).view_as(index)
        else:
            uniform, slots = empty.sum(dim=0) / size, torch.arange(index.shape[1], device=index.device).expand_as(index)
        out = uniform.reshape(-1, 1).expand(-1, size).contiguous()
        sources, targets = index[present], slots[present]
        if sources.numel() == probs.shape[0]:  # every query read by one example: add in place, no gather
            out.index_add_(0, torch.empty_like(sources).scatter_(0, sources, targets), probs)
        else:  # a prefix shared by several examples
            out.index_add_(0, targets, probs[sources])
        return out.view(*uniform.shape, size)

    # -- contract --------------------------------------------------------------

    def calculate_loss(self, batch: Batch) -> torch.Tensor:
        outputs = self._encode(batch)
        total = torch.zeros((), device=self.log_weights.device)
        for domain in (0, 1):
            if batch.domains[domain].num_examples == 0:
                continue
            per_tower = torch.stack(
                [self._domain_log_probs(name, outputs[name], batch, domain) for name in self.towers]
            )
            fused = torch.logsumexp(per_tower + self.log_weights[:, None, None], dim=0)  # [views, E]
            total = total - (self.view_weights[domain][:, None] * fused).sum()
        return total / batch.num_examples

    def full_sort_predict(self, batch: Batch) -> torch.Tensor:
        scores = None
        for weighted in self.tower_scores(batch).values():
            scores = weighted if scores is None else scores + weighted
        return scores

    def tower_scores(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each tower's share of :meth:`full_sort_predict` ([E, N_D] each; they sum to it):
        what a recommendation owes to ids, text, images or tags."""
        return self.tower_scores_by_domain(batch)[batch.target_domain]

    def view_scores(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each sequence view's share of :meth:`full_sort_predict` ([E, N_D] each; they sum
        to it): sum_m alpha_m w_D(s) P_m^s(i), what a recommendation owes to the history's
        items of domain X, of domain Y, or to both merged."""
        domain = batch.target_domain
        parts = sum(
            self._domain_probs(k, batch, domain, self._queries(name, batch, [domain])[0], by_view=True)
            for k, name in enumerate(self.towers)
        )
        return dict(zip(self.views, parts.unbind(0), strict=True))

    def tower_scores_by_domain(self, batch: Batch) -> dict[int, dict[str, torch.Tensor]]:
        """:meth:`tower_scores` of each target domain present in ``batch``, which may mix
        them (a served round does): target domain -> tower -> [E_D, N_D], the domain's
        examples in batch order, with one encoder pass per tower and view for all."""
        present = [d for d in (0, 1) if batch.domains[d].num_examples]
        scores: dict[int, dict[str, torch.Tensor]] = {d: {} for d in present}
        for k, name in enumerate(self.towers):
            for domain, queries in zip(present, self._queries(name, batch, present), strict=True):
                scores[domain][name] = self._domain_probs(k, batch, domain, queries)
        return scores
