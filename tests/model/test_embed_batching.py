"""embed_cells / predict_expression: batching, bucketing, chunking and streaming never change a cell's result."""

from __future__ import annotations

from functools import partial

import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfm.model import ModelConfig, XTrimoGene
from scfm.tasks import embed as embed_module
from scfm.tasks.embed import H5adRows

# batching invariances are properties of the fp32 path; "auto" may pick bf16 on a CPU with native bf16
embed_cells = partial(embed_module.embed_cells, precision="fp32")
predict_expression = partial(embed_module.predict_expression, precision="fp32")
gene_embeddings = partial(embed_module.gene_embeddings, precision="fp32")


@pytest.fixture(scope="module")
def cells(pbmc_counts):
    """50 real PBMCs (765 genes used as the vocabulary), very different numbers of nonzero genes."""
    counts = pbmc_counts.X[:50].tocsr()
    nnz = np.diff(counts.indptr)
    assert nnz.max() > 2 * nnz.min()
    return counts


@pytest.fixture(scope="module")
def model(cells):
    return XTrimoGene(ModelConfig.preset("tiny", n_genes=cells.shape[1]), seed=11).eval()


def _one_at_a_time(model, counts, pool):
    return np.concatenate([embed_cells(model, counts[i : i + 1], pool=pool, batch_size=1, device="cpu")
                           for i in range(counts.shape[0])])


@pytest.mark.parametrize("pool", ["all", "max"])
def test_embedding_does_not_depend_on_batch_mates(model, cells, pool):
    alone = _one_at_a_time(model, cells, pool)
    rng = np.random.default_rng(0)
    for batch_size in (3, 7, 16, 50):
        order = rng.permutation(cells.shape[0])
        shuffled = embed_cells(model, cells[order], pool=pool, batch_size=batch_size, device="cpu")
        restored = np.empty_like(shuffled)
        restored[order] = shuffled
        np.testing.assert_allclose(restored, alone, atol=1e-5, rtol=0)
    width = model.config.encoder_dim * (4 if pool == "all" else 1)
    assert alone.shape == (50, width) and np.isfinite(alone).all()
    assert np.abs(alone[0] - alone[1]).max() > 1e-3  # different cells, different embeddings


def test_chunks_and_token_caps_do_not_change_results(model, cells):
    reference = embed_cells(model, cells, batch_size=64)
    small = embed_cells(model, cells, batch_size=5, chunk_size=7, max_tokens=600)
    np.testing.assert_allclose(small, reference, atol=1e-5, rtol=0)


def test_streaming_from_h5ad_equals_in_memory(model, cells, tmp_path, pbmc_counts):
    path = tmp_path / "cells.h5ad"
    adata = pbmc_counts[:50].copy()
    adata.write_h5ad(path)
    with h5py.File(path, "r") as handle:
        rows = H5adRows(handle["X"], path)
        assert rows.shape == cells.shape
        assert (rows[10:20] != cells[10:20]).nnz == 0
        out = np.zeros((50, 4 * model.config.encoder_dim), dtype=np.float32)
        streamed = embed_cells(model, rows, chunk_size=8, out=out)
    assert streamed is out
    np.testing.assert_allclose(out, embed_cells(model, cells), atol=1e-6, rtol=1e-6)  # float32 rounding


def test_target_depth_and_normalisation_change_the_embedding(model, cells):
    t4 = embed_cells(model, cells[:5])
    t5 = embed_cells(model, cells[:5], target_depth="t5")
    assert np.abs(t4 - t5).max() > 1e-4
    normalised = cells[:5].copy()
    totals = np.asarray(normalised.sum(axis=1)).ravel()
    normalised = sp.csr_matrix(sp.diags(1e4 / totals) @ normalised)
    normalised.data = np.log1p(normalised.data)
    appended = embed_cells(model, normalised, pre_normalized="A", totals=totals)
    np.testing.assert_allclose(appended, t4, atol=1e-5, rtol=0)


def test_bf16_on_cpu_stays_close_to_fp32(model, cells):
    fp32 = embed_cells(model, cells, precision="fp32")
    bf16 = embed_cells(model, cells, precision="bf16")
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99
    assert not np.array_equal(fp32, bf16)


def test_decoder_outputs_do_not_depend_on_batch_mates(model, cells):
    few = cells[:6]
    one = predict_expression(model, few, batch_size=1)
    three = predict_expression(model, few, batch_size=3)
    assert one.shape == (6, model.config.n_genes)
    np.testing.assert_allclose(three, one, atol=1e-5, rtol=0)
    genes = gene_embeddings(model, few[:2], batch_size=2)
    assert genes.shape == (2, model.config.n_genes, model.config.decoder_dim)
    # the expression head applied to the gene embeddings is the expression output
    with torch.no_grad():
        head = model.head(torch.from_numpy(genes)).squeeze(-1).numpy()
    np.testing.assert_allclose(head, one[:2], atol=1e-5, rtol=0)


def test_wrong_width_is_a_clear_error(model, cells):
    from scfm.errors import ScfmError

    with pytest.raises(ScfmError, match="align the input"):
        embed_cells(model, cells[:, :100])
    empty = cells[:3].tolil()
    empty[1, :] = 0
    with pytest.raises(ScfmError, match=r"total count <= 0 \(first: row 1\)"):
        embed_cells(model, empty.tocsr())


def test_packed_cpu_encoder_equals_the_padded_one(model, cells):
    from scfm.model import inputs as model_inputs

    normalised, totals = model_inputs.normalize_counts(cells[:9])
    target, source = model_inputs.depth_tokens(totals, "t4")
    enc = model_inputs.encoder_inputs_from_csr(normalised, target, source, model.config, np.arange(9))
    assert enc.padding_mask.any()  # cells of different lengths: there is padding to skip
    with torch.no_grad():
        padded = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
        packed = model.encode_packed(enc.values, enc.gene_ids, enc.padding_mask)
    real = ~enc.padding_mask
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()
    with pytest.raises(RuntimeError, match="inference"):
        model.train().encode_packed(enc.values, enc.gene_ids, enc.padding_mask)
    model.eval()
