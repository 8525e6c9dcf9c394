"""Building blocks: sequence encoders and the memory-bounded full-softmax normaliser.

Training cost is dominated by the full softmax over the target domain's items: on
LLMCDSR Food-Kitchen one epoch over the 7,501 cross-domain users scores ~205k
distinct (prefix, target domain) queries per tower (3 views x 90k positions, less the
shared prefixes) against 8.7k or 27.6k items: ~3.9 G logits of 256-dim dot products
per tower. :func:`chunked_logsumexp` computes the normaliser with a custom backward.
When a call's logits fit in :data:`STORE_ELEMENTS` the exponentiated logits are kept
from forward to backward, which then costs two matmuls and one pass (3 matmuls per
logit in all; 1.3-1.6x faster than recomputing). On that release a batch of 256
sequences gives 8-220 M logits per call (TEMA-LLM: six calls a step, up to ~3.3 GB
kept); one batch in 30 passes the CPU budget for its larger domain. Larger calls run in
row chunks and recompute each chunk's logits in backward (4 matmuls), so memory stays
at one chunk where autograd would keep every intermediate of the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

STORE_ELEMENTS = {"cpu": 1 << 28, "cuda": 1 << 28}
"""Logits per call kept for backward: up to 1 GiB (fp32) on CPU and CUDA alike, so the
six calls of a TEMA-LLM step keep at most 6 GiB: within a 16 GB GPU."""
CHUNK_ELEMENTS = {"cpu": 1 << 23, "cuda": 1 << 26}
"""Logits per chunk above that: 32 MB on CPU (a few hundred query rows: an efficient
matmul shape while the elementwise passes stay small), 256 MB on CUDA (few, large kernels)."""
EXP_SAFE = 80.0
"""exp() of fp32 logits is safe without a shift while every logit lies in
[-EXP_SAFE, EXP_SAFE] and ``N * exp(max)`` stays finite (fp32 exp overflows above ~88)."""


def keeps_logits(num_queries: int, num_candidates: int, device: torch.device) -> bool:
    """Whether :func:`chunked_logsumexp` keeps this call's logits for backward (3
    matmuls per logit) rather than recomputing them in chunks (4)."""
    return num_queries * num_candidates <= STORE_ELEMENTS.get(device.type, STORE_ELEMENTS["cpu"])


def _chunk_rows(queries: torch.Tensor, candidates: torch.Tensor) -> int:
    budget = CHUNK_ELEMENTS.get(queries.device.type, CHUNK_ELEMENTS["cpu"])
    return max(64, budget // max(1, candidates.shape[0]))


def needs_shift(max_logit: float | None, num_candidates: int) -> bool:
    """Whether exp(logits) needs a shift: always for unbounded (dot) scores."""
    return max_logit is None or max_logit + math.log(max(1, num_candidates)) > EXP_SAFE


def _product_dtype(queries: torch.Tensor) -> torch.dtype:
    """bf16 under CPU bf16 autocast (the trainer's ``precision: bf16``), else the queries' dtype."""
    if queries.device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return torch.bfloat16
    return queries.dtype


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums, normalisers and gradients: fp32 for bf16 products."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


class _ChunkedLogSumExp(torch.autograd.Function):
    # On CUDA fp32 throughout, also under autocast: on a GPU this is not the bottleneck.
    # On CPU under bf16 autocast the logits' matrix products run in bf16 (2-3x the fp32
    # rate with AVX-512 BF16) and the kept exp(logits) are bf16 (half the memory
    # traffic of the elementwise passes). Sums accumulate in fp32 (torch reduces bf16 in
    # fp32) and are rounded to bf16 once: at most 2^-8 relative, 0.004 in log space (an
    # fp32-output reduction of bf16 runs 8x slower here). The normaliser is returned,
    # and subtracted in backward, in fp32: a bf16 log normaliser of a ~30k-way softmax
    # (about 20) would be off by up to 1/16.
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, queries: torch.Tensor, candidates: torch.Tensor, max_logit: float | None) -> torch.Tensor:
        dtype = _product_dtype(queries)
        ctx.input_dtypes = (queries.dtype, candidates.dtype)
        with torch.autocast(queries.device.type, enabled=False):
            queries, candidates = queries.to(dtype), candidates.to(dtype)
            if keeps_logits(queries.shape[0], candidates.shape[0], queries.device):
                return _ChunkedLogSumExp._forward_stored(ctx, queries, candidates, max_logit)
            ctx.stored = False
            rows = _chunk_rows(queries, candidates)
            out = torch.empty(queries.shape[0], dtype=_sum_dtype(dtype), device=queries.device)
            cand_t = candidates.t()
            for start in range(0, queries.shape[0], rows):
                block = queries[start : start + rows]
                if max_logit is None:
                    logits = block @ cand_t
                    shift = logits.amax(dim=1, keepdim=True)
                    logits.sub_(shift)
                else:  # a known bound replaces the max pass (cosine scores: 1/tau)
                    shift = queries.new_full((1, 1), max_logit)
                    logits = torch.addmm(-shift, block, cand_t)
                out[start : start + rows] = logits.exp_().sum(dim=1).to(out.dtype).log_().add_(shift.squeeze(1).to(out.dtype))
            ctx.save_for_backward(queries, candidates, out)
            return out

    @staticmethod
    def _forward_stored(ctx, queries: torch.Tensor, candidates: torch.Tensor, max_logit: float | None) -> torch.Tensor:
        """exp(logits - shift) kept for backward, with their sums.

        The logits are formed transposed, [N, M] = candidates @ queries.T: on CPU that
        matmul runs 1.2-1.6x faster than [M, N] = queries @ candidates.T (MKL, 2
        threads), and the backward's two matmuls are as fast either way.
        """
        ctx.stored = True
        exp_logits_t = candidates @ queries.t()
        if needs_shift(max_logit, candidates.shape[0]):
            shift = exp_logits_t.amax(dim=0) if max_logit is None else exp_logits_t.new_full((1,), max_logit)
            exp_logits_t.sub_(shift)
        else:  # bounded logits (cosine): exp() cannot overflow, and a shift would cost a pass
            shift = exp_logits_t.new_zeros((1,))
        sums = exp_logits_t.exp_().sum(dim=0).to(_sum_dtype(exp_logits_t.dtype))
        ctx.save_for_backward(queries, candidates, exp_logits_t, sums)
        return sums.log().add_(shift.to(sums.dtype))

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        query_dtype, candidate_dtype = ctx.input_dtypes
        if ctx.stored:
            queries, candidates, exp_logits_t, sums = ctx.saved_tensors
            # softmax * upstream gradient, formed in place on the kept exp(logits) (a
            # second backward through the same graph fails on autograd's version check)
            weights_t = exp_logits_t.mul_((grad / sums).to(exp_logits_t.dtype))
            grad_q = weights_t.t() @ candidates if ctx.needs_input_grad[0] else None
            grad_c = weights_t @ queries if ctx.needs_input_grad[1] else None
            return _as(grad_q, query_dtype), _as(grad_c, candidate_dtype), None
        queries, candidates, lse = ctx.saved_tensors
        rows = _chunk_rows(queries, candidates)
        grad_q = queries.new_empty(queries.shape, dtype=lse.dtype) if ctx.needs_input_grad[0] else None
        grad_c = candidates.new_zeros(candidates.shape, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        cand_t = candidates.t()
        for start in range(0, queries.shape[0], rows):
            block = queries[start : start + rows]
            # softmax(logits) * upstream gradient, formed in place on recomputed logits;
            # the normaliser is subtracted in fp32 (in bf16 it would be off by up to 1/16)
            if block.dtype == lse.dtype:
                weights = torch.addmm(-lse[start : start + rows, None], block, cand_t).exp_()
            else:
                weights = (block @ cand_t).to(lse.dtype).sub_(lse[start : start + rows, None]).exp_()
            weights = weights.mul_(grad[start : start + rows, None]).to(block.dtype)
            if grad_q is not None:
                grad_q[start : start + rows] = weights @ candidates
            if grad_c is not None and block.dtype == lse.dtype:
                grad_c.addmm_(weights.t(), block)
            elif grad_c is not None:
                grad_c.add_(weights.t() @ block)
        return _as(grad_q, query_dtype), _as(grad_c, candidate_dtype), None


def _as(grad: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if grad is None else grad.to(dtype)


def chunked_logsumexp(queries: torch.Tensor, candidates: torch.Tensor, max_logit: float | None = None) -> torch.Tensor:
    """``logsumexp(queries @ candidates.T, dim=1)`` without materialising the logits.

    Args:
        queries: [M, d] (already scaled, e.g. by 1/temperature).
        candidates: [N, d].
        max_logit: an upper bound of every logit, if known (cosine scores: 1/tau);
            saves a pass. Must keep ``logit - max_logit`` above ~-80 (fp32 exp).
    Returns:
        float32 [M]; differentiable w.r.t. queries and candidates.
    """
    return _ChunkedLogSumExp.apply(queries, candidates, max_logit)


class _AttentionBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention + feed-forward."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout_p = dropout
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(batch, length, 3, self.num_heads, dim // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout_p if self.training else 0.0
        )
        x = x + self.dropout(self.proj(attended.transpose(1, 2).reshape(batch, length, dim)))
        return x + self.dropout(self.ffn(self.norm2(x)))

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[rows, positions]`` ([Q, d]): keys and values at every position,
        queries, projection and feed-forward only at the positions read."""
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        kv = F.linear(self.norm1(x), self.qkv.weight[dim:], self.qkv.bias[dim:])
        k, v = kv.view(batch, length, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, L, hd]
        at = x[rows, positions]  # [Q, d]
        q = F.linear(self.norm1(at), self.qkv.weight[:dim], self.qkv.bias[:dim]).view(-1, heads, 1, head_dim)
        causal = torch.arange(length, device=x.device)[None, :] <= positions[:, None]  # [Q, L]
        attended = F.scaled_dot_product_attention(
            q, k[rows], v[rows], attn_mask=causal[:, None, None, :], dropout_p=self.dropout_p if self.training else 0.0
        )
        at = at + self.dropout(self.proj(attended.reshape(-1, dim)))
        return at + self.dropout(self.ffn(self.norm2(at)))


class CausalSelfAttentionEncoder(nn.Module):
    """Learned positional embedding + causal self-attention blocks (SASRec-style).

    Input [B, L, d] right-padded: position t only attends to positions <= t, so the
    outputs at real positions never depend on padding.
    """

    def __init__(self, dim: int, num_layers: int, num_heads: int, dropout: float, max_len: int):
        super().__init__()
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.input_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_AttentionBlock(dim, num_heads, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_dropout(x + self.positions.weight[: x.shape[1]])
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[rows, positions]`` ([Q, d]), the last block computed only at those
        positions. Inference reads one position per sequence: with one block (the papers'
        setting) this skips two thirds of its products (keys and values, 2d^2 of the
        block's 6d^2 per position, are all that every position still needs)."""
        x = self.input_dropout(x + self.positions.weight[: x.shape[1]])
        if not self.blocks:
            return self.norm(x[rows, positions])
        for block in self.blocks[:-1]:
            x = block(x)
        return self.norm(self.blocks[-1].forward_at(x, rows, positions))


class GRUEncoder(nn.Module):
    """GRU4Rec: a GRU over the (dropped-out) item embeddings; causal by construction."""

    def __init__(self, dim: int, num_layers: int, dropout: float):
        super().__init__()
        self.input_dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(dim, dim, num_layers=num_layers, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gru(self.input_dropout(x))[0]

    def forward_at(self, x: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``forward(x)[rows, positions]``: a recurrence has to run every position anyway."""
        return self.forward(x)[rows, positions]
