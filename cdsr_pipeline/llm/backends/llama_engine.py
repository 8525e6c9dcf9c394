"""llama.cpp driven through its low-level API, for throughput on a few CPU cores.

The high-level ``llama_cpp.Llama`` evaluates one sequence at a time and re-evaluates
whatever prompt it is given. The LLM stages send thousands of prompts that share a
long few-shot prefix and differ in a short per-item body, so this engine:

- keeps the KV cache of the shared prefix in sequence 0 and gives every worker
  sequence a copy of it (``llama_memory_seq_cp``; with a unified KV cache the copy
  shares the cells, it costs nothing), so only the body is evaluated per item;
- decodes several sequences in one ``llama_decode`` call (one token per live
  sequence and step), each with its own sampler chain;
- scores candidate continuations by log-probability with a token trie: the body is
  evaluated once, shared continuation tokens once, all in one batch where tokens
  belong to several sequences at the same time.

Sequence ids: 0 holds the prefix; ``1 .. n_parallel`` are workers.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _logger as llama_logger

log = logging.getLogger(__name__)

PREFIX_SEQ = 0


@dataclass(frozen=True)
class Generation:
    """One generated answer."""

    text: str
    finish_reason: str  # "stop" (stop string or end-of-generation token) | "length"
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@dataclass(frozen=True)
class GenerationRequest:
    body: str
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    seed: int = 0
    repeat_penalty: float = 1.0  # over the last 64 tokens, as Ollama's repeat_penalty
    grammar: str | None = None  # GBNF: constrains the output


@dataclass
class _Token:
    """One token of a decode batch."""

    token: int
    pos: int
    seqs: tuple[int, ...]
    wants_logits: bool


class LlamaEngine:
    """One GGUF model and one context with ``n_parallel`` worker sequences."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int = 2,
        n_parallel: int = 16,
    ):
        llama_logger.set_verbose(False)
        llama_cpp.llama_backend_init()
        self.model_path = Path(model_path)
        self._model = llama_cpp.llama_model_load_from_file(
            str(self.model_path).encode("utf-8"), llama_cpp.llama_model_default_params()
        )
        if not self._model:
            raise ValueError(f"llama.cpp could not load the model {self.model_path}")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_parallel + 1
        # One KV buffer for all sequences: copying the prefix into a worker then
        # shares its cells instead of duplicating them.
        params.kv_unified = True
        # Full-size sliding-window caches (Gemma 3): sequences are copied and trimmed.
        params.swa_full = True
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        self._ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise ValueError(f"llama.cpp could not create a context for {self.model_path}")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.n_parallel = n_parallel
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, n_parallel + 1)
        self._prefix_text: str | None = None
        self._prefix_tokens: list[int] = []
        self._prefix_last_logits: np.ndarray | None = None
        # what the benchmarks turn into FLOP/s: about 2 x parameters per evaluated token
        self.n_params = int(llama_cpp.llama_model_n_params(self._model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model))
        self.tokens_evaluated = 0
        self.decode_calls = 0

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None
            self._model = None

    def __enter__(self) -> LlamaEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tokens -----------------------------------------------------------------
    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, add_special, False)
        if count < 0:
            raise ValueError(f"tokenization overflow ({-count} tokens)")
        return list(buffer[:count])

    def token_bytes(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]

    # -- KV cache and decoding --------------------------------------------------
    def _decode(self, tokens: Sequence[_Token]) -> np.ndarray:
        """Evaluate ``tokens`` (at most ``n_batch``); logits rows of those that want them."""
        batch = self._batch
        batch.n_tokens = len(tokens)
        for i, item in enumerate(tokens):
            batch.token[i] = item.token
            batch.pos[i] = item.pos
            batch.n_seq_id[i] = len(item.seqs)
            for j, seq in enumerate(item.seqs):
                batch.seq_id[i][j] = seq
            batch.logits[i] = item.wants_logits
        code = llama_cpp.llama_decode(self._ctx, batch)
        self.tokens_evaluated += len(tokens)
        self.decode_calls += 1
        if code != 0:
            raise RuntimeError(
                f"llama_decode returned {code} (KV cache full? n_ctx={self.n_ctx}, "
                f"n_parallel={self.n_parallel})"
            )
        n_out = sum(item.wants_logits for item in tokens)
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        logits = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(logits, shape=(n_out, self.n_vocab)).copy()

    def _decode_chunked(self, tokens: Sequence[_Token]) -> np.ndarray:
        """Like :meth:`_decode` for any number of tokens, in causal order."""
        rows = [self._decode(tokens[i : i + self.n_batch]) for i in range(0, len(tokens), self.n_batch)]
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), dtype=np.float32)

    def _set_prefix(self, prefix: str) -> None:
        """Evaluate ``prefix`` into sequence 0 unless it is already there."""
        if prefix == self._prefix_text:
            return
        llama_cpp.llama_memory_clear(self._memory, True)
        tokens = self.tokenize(prefix, add_special=True)
        if not tokens:
            raise ValueError("empty prompt prefix")
        started = time.perf_counter()
        rows = self._decode_chunked(
            [_Token(tok, pos, (PREFIX_SEQ,), pos == len(tokens) - 1) for pos, tok in enumerate(tokens)]
        )
        log.debug("prefix of %d tokens evaluated in %.2fs", len(tokens), time.perf_counter() - started)
        self._prefix_text = prefix
        self._prefix_tokens = tokens
        self._prefix_last_logits = rows[-1]

    def _fork_workers(self, seqs: Sequence[int]) -> None:
        for seq in seqs:
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)
            llama_cpp.llama_memory_seq_cp(self._memory, PREFIX_SEQ, seq, -1, -1)

    def _release_workers(self) -> None:
        for seq in range(1, self.n_parallel + 1):
            llama_cpp.llama_memory_seq_rm(self._memory, seq, -1, -1)

    def _check_fits(self, n_tokens: int) -> None:
        if n_tokens > self.n_ctx:
            raise ValueError(f"{n_tokens} tokens do not fit the context (n_ctx={self.n_ctx})")

    # -- generation --------------------------------------------------------------
    def generate(
        self, prefix: str, requests: Sequence[GenerationRequest], *, batch_size: int | None = None
    ) -> list[Generation]:
        """Answer ``prefix + request.body`` for each request, ``batch_size`` sequences at a time.

        Batched sequences run through other matrix kernels than a single one, so a
        greedy answer can differ in rare near-ties with the batch composition.
        """
        width = min(batch_size or self.n_parallel, self.n_parallel)
        self._set_prefix(prefix)
        results: list[Generation] = []
        group: list[GenerationRequest] = []
        budget = self.n_ctx - len(self._prefix_tokens)
        used = 0
        for request in requests:
            need = len(self.tokenize(request.body, add_special=False)) + request.max_tokens
            self._check_fits(len(self._prefix_tokens) + need)
            if group and (len(group) == width or used + need > budget):
                results.extend(self._generate_group(group))
                group, used = [], 0
            group.append(request)
            used += need
        if group:
            results.extend(self._generate_group(group))
        return results

    def _generate_group(self, requests: Sequence[GenerationRequest]) -> list[Generation]:
        started = time.perf_counter()
        n_prefix = len(self._prefix_tokens)
        seqs = list(range(1, len(requests) + 1))
        self._fork_workers(seqs)
        samplers = [self._sampler(request) for request in requests]
        try:
            bodies = [self.tokenize(r.body, add_special=False) for r in requests]
            pending: list[_Token] = []
            owners: list[int] = []  # request index of each logits row in ``pending``
            next_token: list[int | None] = [None] * len(requests)

            def flush() -> None:
                self._decode_into_samplers(pending, owners, samplers, next_token)
                pending.clear()
                owners.clear()

            for index, (seq, body) in enumerate(zip(seqs, bodies, strict=True)):
                if not body:
                    raise ValueError("empty prompt body")
                for start in range(0, len(body), self.n_batch):
                    piece = body[start : start + self.n_batch]
                    if len(pending) + len(piece) > self.n_batch:
                        flush()
                    last_piece = start + len(piece) == len(body)
                    for k, tok in enumerate(piece):
                        wants = last_piece and k == len(piece) - 1
                        pending.append(_Token(tok, n_prefix + start + k, (seq,), wants))
                        if wants:
                            owners.append(index)
            flush()

            generated: list[list[int]] = [[] for _ in requests]
            texts = [b"" for _ in requests]
            finish: list[str | None] = [None] * len(requests)
            while True:
                step: list[_Token] = []
                step_owners: list[int] = []
                for index, request in enumerate(requests):
                    if finish[index] is not None:
                        continue
                    token = next_token[index]
                    assert token is not None
                    if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                        finish[index] = "stop"
                        continue
                    generated[index].append(token)
                    texts[index] += self.token_bytes(token)
                    if _find_stop(texts[index], request.stop) is not None:
                        finish[index] = "stop"
                        continue
                    if len(generated[index]) >= request.max_tokens:
                        finish[index] = "length"
                        continue
                    pos = n_prefix + len(bodies[index]) + len(generated[index]) - 1
                    step.append(_Token(token, pos, (seqs[index],), True))
                    step_owners.append(index)
                if not step:
                    break
                self._decode_into_samplers(step, step_owners, samplers, next_token)
        finally:
            for sampler in samplers:
                llama_cpp.llama_sampler_free(sampler)
            self._release_workers()
        latency = (time.perf_counter() - started) / len(requests)
        out = []
        for index, request in enumerate(requests):
            text = texts[index].decode("utf-8", errors="replace")
            cut = _find_stop(texts[index], request.stop)
            if cut is not None:
                text = texts[index][:cut].decode("utf-8", errors="replace")
            out.append(
                Generation(
                    text=text,
                    finish_reason=finish[index] or "length",
                    prompt_tokens=n_prefix + len(bodies[index]),
                    completion_tokens=len(generated[index]),
                    latency_s=latency,
                )
            )
        return out

    def _decode_into_samplers(
        self,
        tokens: Sequence[_Token],
        owners: Sequence[int],
        samplers: Sequence[llama_cpp.llama_sampler_p],
        next_token: list[int | None],
    ) -> None:
        """Decode ``tokens`` and sample the next token of each request that owns a logits row."""
        if not tokens:
            return
        self._decode(tokens)
        batch_rows = [i for i, item in enumerate(tokens) if item.wants_logits]
        for batch_index, owner in zip(batch_rows, owners, strict=True):
            next_token[owner] = llama_cpp.llama_sampler_sample(samplers[owner], self._ctx, batch_index)

    def _sampler(self, request: GenerationRequest) -> llama_cpp.llama_sampler_p:
        """Grammar, repeat penalty, then greedy at temperature 0, else top-k/top-p/temperature with the seed."""
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if request.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(self._vocab, request.grammar.encode("utf-8"), b"root")
            if not grammar:
                llama_cpp.llama_sampler_free(chain)
                raise ValueError("llama.cpp rejected the grammar")
            llama_cpp.llama_sampler_chain_add(chain, grammar)
        if request.repeat_penalty != 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_penalties(self.n_vocab, 64, request.repeat_penalty, 0.0, 0.0)
            )
        if request.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(40))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(0.95, 1))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(request.temperature))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(request.seed & 0xFFFFFFFF))
        return chain

    # -- continuation scoring ---------------------------------------------------
    def continuation_logprobs(
        self, prefix: str, items: Sequence[tuple[str, Sequence[str]]]
    ) -> list[list[float]]:
        """log P(continuation | prefix + body) for each (body, continuations) item.

        Each continuation is a full string (include its terminator, e.g. ``" tea\\n"``,
        so that a tag that is a prefix of another is not credited with the longer
        one's probability). Items are packed into as few decode calls as the worker
        sequences and the batch size allow.
        """
        self._set_prefix(prefix)
        encoded = []
        for body, continuations in items:
            body_tokens = self.tokenize(body, add_special=False)
            cont_tokens = [self.tokenize(c, add_special=False) for c in continuations]
            if not body_tokens or not cont_tokens or any(not c for c in cont_tokens):
                raise ValueError("empty body or continuation")
            if len(cont_tokens) > self.n_parallel:
                raise ValueError(f"{len(cont_tokens)} continuations exceed n_parallel={self.n_parallel}")
            trie = _Trie.build(cont_tokens)
            size = len(body_tokens) + trie.n_internal
            if size > self.n_batch:
                raise ValueError(f"an item needs {size} tokens in one batch (n_batch={self.n_batch})")
            self._check_fits(len(self._prefix_tokens) + size)
            encoded.append((body_tokens, cont_tokens, trie, size))
        results: list[list[float]] = []
        group: list[tuple[list[int], list[list[int]], _Trie, int]] = []
        seqs_used = tokens_used = 0
        for entry in encoded:
            n_seqs, size = len(entry[1]), entry[3]
            if group and (
                seqs_used + n_seqs > self.n_parallel
                or tokens_used + size > self.n_batch
                or len(self._prefix_tokens) + tokens_used + size > self.n_ctx
            ):
                results.extend(self._score_group(group))
                group, seqs_used, tokens_used = [], 0, 0
            group.append(entry)
            seqs_used += n_seqs
            tokens_used += size
        if group:
            results.extend(self._score_group(group))
        return results

    def _score_group(self, group: Sequence[tuple[list[int], list[list[int]], _Trie, int]]) -> list[list[float]]:
        n_prefix = len(self._prefix_tokens)
        batch: list[_Token] = []
        layouts = []  # per item: its batch rows for the body end and each trie node
        next_seq = 1
        for body_tokens, cont_tokens, trie, _ in group:
            seqs = tuple(range(next_seq, next_seq + len(cont_tokens)))
            next_seq += len(cont_tokens)
            self._fork_workers(seqs)
            for k, tok in enumerate(body_tokens):
                batch.append(_Token(tok, n_prefix + k, seqs, k == len(body_tokens) - 1))
            body_row = sum(t.wants_logits for t in batch) - 1
            node_rows = {}
            for node in trie.internal_nodes():
                node_rows[node.path] = sum(t.wants_logits for t in batch)
                node_seqs = tuple(seqs[i] for i in node.continuations)
                batch.append(_Token(node.token, n_prefix + len(body_tokens) + node.depth, node_seqs, True))
            layouts.append((cont_tokens, body_row, node_rows))
        try:
            rows = self._decode(batch)
        finally:
            self._release_workers()
        log_norm = _log_softmax_rows(rows)
        out = []
        for cont_tokens, body_row, node_rows in layouts:
            scores = []
            for tokens in cont_tokens:
                total = float(log_norm(body_row, tokens[0]))
                for depth in range(1, len(tokens)):
                    total += float(log_norm(node_rows[tuple(tokens[:depth])], tokens[depth]))
                scores.append(total)
            out.append(scores)
        return out


def _log_softmax_rows(rows: np.ndarray):
    """A function (row, token) -> log-softmax of ``rows[row]`` at ``token`` (normalizer cached)."""
    norms: dict[int, float] = {}

    def value(row: int, token: int) -> float:
        if row not in norms:
            r = rows[row].astype(np.float64)
            peak = r.max()
            norms[row] = peak + np.log(np.exp(r - peak).sum())
        return rows[row, token] - norms[row]

    return value


@dataclass(frozen=True)
class _TrieNode:
    path: tuple[int, ...]  # tokens from the root to this node included
    continuations: tuple[int, ...]  # indices of the continuations that pass through it

    @property
    def token(self) -> int:
        return self.path[-1]

    @property
    def depth(self) -> int:
        return len(self.path) - 1


class _Trie:
    """The token prefixes shared by candidate continuations.

    A node is evaluated only if some continuation goes on after it (its logits
    give the next token's probability); the body's last logits give the first.
    """

    def __init__(self, nodes: list[_TrieNode]):
        self._nodes = nodes

    @classmethod
    def build(cls, continuations: Sequence[Sequence[int]]) -> _Trie:
        members: dict[tuple[int, ...], list[int]] = {}
        for index, tokens in enumerate(continuations):
            for depth in range(1, len(tokens)):  # the last token is never evaluated
                members.setdefault(tuple(tokens[:depth]), []).append(index)
        nodes = [_TrieNode(path, tuple(idx)) for path, idx in members.items()]
        nodes.sort(key=lambda node: len(node.path))  # parents before children
        return cls(nodes)

    @property
    def n_internal(self) -> int:
        return len(self._nodes)

    def internal_nodes(self) -> list[_TrieNode]:
        return self._nodes


def _find_stop(text: bytes, stops: Sequence[str]) -> int | None:
    """Byte offset of the earliest stop string in ``text``, if any."""
    hits = [text.find(stop.encode("utf-8")) for stop in stops]
    hits = [h for h in hits if h >= 0]
    return min(hits) if hits else None
