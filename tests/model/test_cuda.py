"""The CUDA path: the same cells give the same embeddings on a GPU (fp32) and agree in bf16.

These run only where torch sees a CUDA device; on a CPU-only machine they are skipped.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm.model import ModelConfig, XTrimoGene
from scfm.tasks.embed import embed_cells, predict_expression, resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def cells(pbmc_counts):
    return pbmc_counts.X[:64].tocsr()


@pytest.fixture(scope="module")
def model(cells):
    return XTrimoGene(ModelConfig.preset("small", n_genes=cells.shape[1]), seed=5).eval()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 when comparing with the CPU
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_gpu_fp32_equals_cpu_fp32(model, cells):
    on_cpu = embed_cells(model, cells, device="cpu", precision="fp32", batch_size=8)
    on_gpu = embed_cells(model, cells, device="cuda", precision="fp32", batch_size=64)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-4, rtol=0)


def test_gpu_bf16_agrees_with_fp32_per_cell(model, cells):
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    fp32 = embed_cells(model, cells, device="cpu", precision="fp32", batch_size=8)
    bf16 = embed_cells(model, cells, device="cuda", precision="auto", batch_size=64)
    assert bf16.dtype == np.float32 and np.isfinite(bf16).all()
    assert _cosine(fp32, bf16).min() >= 0.999


def test_gpu_batch_mates_do_not_change_an_embedding(model, cells):
    alone = np.concatenate([embed_cells(model, cells[i : i + 1], device="cuda", precision="fp32", batch_size=1)
                            for i in range(16)])
    order = np.random.default_rng(0).permutation(16)
    shuffled = embed_cells(model, cells[:16][order], device="cuda", precision="fp32", batch_size=5)
    restored = np.empty_like(shuffled)
    restored[order] = shuffled
    np.testing.assert_allclose(restored, alone, atol=1e-4, rtol=0)


def test_gpu_decoder_output_matches_cpu(model, cells):
    on_cpu = predict_expression(model, cells[:4], device="cpu", precision="fp32", batch_size=2)
    on_gpu = predict_expression(model, cells[:4], device="cuda", precision="fp32", batch_size=4)
    np.testing.assert_allclose(on_gpu, on_cpu, atol=1e-3, rtol=0)


def test_gpu_bf16_training_step_reduces_the_loss(cells):
    from scfm.model.inputs import encoder_inputs_from_csr, normalize_counts

    torch.manual_seed(0)
    config = ModelConfig.preset("tiny", n_genes=cells.shape[1])
    net = XTrimoGene(config, seed=3).cuda().train()
    optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3)
    normalised, totals = normalize_counts(cells[:16], pre_normalized="F")
    depth = np.log10(totals).astype(np.float32)
    enc = encoder_inputs_from_csr(normalised, depth, depth, config).to("cuda")
    target = torch.randn(16, 4 * config.encoder_dim, device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = net.cell_embedding(net.encode(enc.values, enc.gene_ids, enc.padding_mask), enc)
            loss = torch.nn.functional.mse_loss(emb.float(), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
