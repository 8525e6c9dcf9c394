"""The CUDA path, where a GPU is present (marker ``gpu``; skipped elsewhere, so CI never
depends on one): a training step on CUDA equals the CPU step (fp32) and stays close in
bf16 autocast, the softmax normaliser's kept-logits and chunked paths on CUDA, and the
text encoder on CUDA. Run them on a GPU machine with ``pytest -m gpu``."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from cdsr_pipeline.features.encoders import EncoderSpec, bundled_minilm_dir, load_text_encoder
from cdsr_pipeline.model import PRESETS
from cdsr_pipeline.model.build import build_model
from cdsr_pipeline.model.data import DenseFeature, Domains, ItemFeatures, SequenceArrays, TagFeature, make_batch
from cdsr_pipeline.model.layers import chunked_logsumexp

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")]

DOMAINS = Domains("toy", ("Alpha", "Beta"), (40, 60))
N = DOMAINS.num_items


def _model(preset: str):
    generator = torch.Generator().manual_seed(0)
    dense = {name: DenseFeature(torch.randn(N, 24, generator=generator), torch.ones(N, dtype=torch.bool)) for name in ("tex", "llm", "img")}
    tags = TagFeature(offsets=torch.arange(N + 1) * 2, tag_ids=torch.arange(2 * N) % 7, weights=torch.ones(2 * N), num_tags=7)
    torch.manual_seed(0)
    config = dataclasses.replace(PRESETS[preset], hidden_dim=32, dropout=0.0)
    return build_model(config, DOMAINS, ItemFeatures(dense=dense, tags=tags), max_len=12, item_counts=np.zeros(N)).train()


def _batch(model):
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 12, size=16)
    inputs = np.full((16, 12), -1)
    targets = np.full((16, 12), -1)
    for row, length in enumerate(lengths):
        walk = rng.integers(0, N, size=length + 1)
        inputs[row, :length], targets[row, :length] = walk[:-1], walk[1:]
    return make_batch(SequenceArrays(inputs=inputs, targets=targets, lengths=lengths), np.arange(16), DOMAINS, model.views)


def _step(model, batch, device: str, bf16: bool = False):
    model = copy.deepcopy(model).to(device)
    batch = batch.to(torch.device(device))
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        loss = model.calculate_loss(batch)
    loss.backward()
    return loss.item(), {name: p.grad.detach().cpu() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset", ["sasrec", "llm_emf", "tema_llm"])
def test_a_training_step_on_cuda_equals_the_cpu_step_and_stays_close_in_bf16(preset):
    model = _model(preset)
    batch = _batch(model)
    cpu_loss, cpu_grads = _step(model, batch, "cpu")
    cuda_loss, cuda_grads = _step(model, batch, "cuda")
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-4)
    assert cpu_grads.keys() == cuda_grads.keys()
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
    bf16_loss, _ = _step(model, batch, "cuda", bf16=True)
    assert bf16_loss == pytest.approx(cpu_loss, rel=2e-2)


@pytest.mark.parametrize("rows, candidates", [(64, 500), (10_000, 30_000)])  # logits kept / above the keeping budget: chunked
def test_the_softmax_normaliser_on_cuda_matches_logsumexp(rows, candidates):
    generator = torch.Generator().manual_seed(1)
    queries = torch.randn(rows, 32, generator=generator, dtype=torch.float64).float().cuda().requires_grad_()
    items = torch.randn(candidates, 32, generator=generator, dtype=torch.float64).float().cuda().requires_grad_()
    ours = chunked_logsumexp(queries, items)
    reference = torch.logsumexp(queries.double() @ items.double().t(), dim=1)
    torch.testing.assert_close(ours.double(), reference, rtol=1e-5, atol=1e-4)
    ours.sum().backward()
    expected_q, expected_i = torch.autograd.grad(reference.sum(), [queries, items])
    torch.testing.assert_close(queries.grad.double(), expected_q.double(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(items.grad.double(), expected_i.double(), rtol=1e-4, atol=1e-5)


def test_the_text_encoder_on_cuda_gives_the_cpu_vectors():
    titles = ["Earl Grey tea, loose leaf", "Cast iron skillet, 12 inch", "Organic dark chocolate 85%", "Chef's knife"]
    spec = EncoderSpec(backend="sentence_transformers", model=str(bundled_minilm_dir()))
    cpu = load_text_encoder(dataclasses.replace(spec, device="cpu")).encode_texts(titles)
    cuda = load_text_encoder(dataclasses.replace(spec, device="cuda")).encode_texts(titles)
    assert (np.sum(cpu * cuda, axis=1) >= 0.999).all()
