"""Bulk input (`--input-type bulk`): T and S tokens and normalisation as the released embedding script sets them.

Our reading of the released `get_embedding.py` for `--input_type bulk`:
- `--pre_normalized F`: the whole table goes through scanpy's `normalize_total` (default target: the median
  total of the samples) and `log1p`; then per sample `T = S = log10(sum of the transformed values)`.
- `--pre_normalized T`: values are used as given and `T = S = their sum` (no log10).
- the target depth (`--tgthighres`) is not used; `A` is refused.
"""

from __future__ import annotations

import math
from functools import partial

import anndata as ad
import h5py
import numpy as np
import pytest
import scanpy as sc
import scipy.sparse as sp
from click.testing import CliRunner

from scfm.cli import cli
from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError
from scfm.model import ModelConfig, XTrimoGene
from scfm.model.checkpoint import save_checkpoint
from scfm.model.inputs import bulk_target_sum, encoder_inputs_from_csr, normalize_bulk
from scfm.tasks import embed as embed_module

# exact comparisons hold on the fp32 path; "auto" may pick bf16 on a CPU with native bf16
embed_cells = partial(embed_module.embed_cells, precision="fp32")


def _tokens(normalised, target, source, config, row):
    enc = encoder_inputs_from_csr(normalised, target, source, config, rows=[row])
    keep = ~enc.padding_mask[0]
    return enc.gene_ids[0][keep].tolist(), enc.values[0][keep].tolist()


def test_raw_bulk_tokens_by_hand():
    # totals 10, 30, 20 -> median 20: the first sample is scaled by 20/10, the second by 20/30
    counts = np.array([[4.0, 6.0, 0.0], [0.0, 15.0, 15.0], [5.0, 5.0, 10.0]])
    assert bulk_target_sum(counts.sum(axis=1)) == 20.0
    normalised, target, source = normalize_bulk(counts, target_sum=20.0, pre_normalized="F")
    config = ModelConfig.preset("tiny", n_genes=3)

    ids, values = _tokens(normalised, target, source, config, 0)
    first = [math.log1p(8.0), math.log1p(12.0)]
    depth = math.log10(sum(first))
    assert ids == [0, 1, config.t_position, config.s_position]
    assert values == [np.float32(v) for v in [*first, depth, depth]]

    ids, values = _tokens(normalised, target, source, config, 1)
    second = [math.log1p(10.0), math.log1p(10.0)]
    depth = math.log10(sum(second))
    assert ids == [1, 2, config.t_position, config.s_position]
    assert values == [np.float32(v) for v in [*second, depth, depth]]


def test_prenormalised_bulk_tokens_are_the_plain_sum():
    values_in = np.array([[0.5, 0.0, 2.0], [1.25, 1.25, 0.0]])
    normalised, target, source = normalize_bulk(values_in, pre_normalized="T")
    config = ModelConfig.preset("tiny", n_genes=3)
    ids, values = _tokens(normalised, target, source, config, 0)
    assert ids == [0, 2, config.t_position, config.s_position]
    assert values == [0.5, 2.0, 2.5, 2.5]  # T = S = 0.5 + 2.0, no log
    assert target.tolist() == source.tolist() == [2.5, 2.5]


def test_raw_bulk_matches_scanpy_as_the_released_script_uses_it():
    """normalize_total (default target) + log1p on the whole table, then log10 of each row's sum."""
    rng = np.random.default_rng(0)
    counts = rng.gamma(0.3, 200.0, size=(9, 40)) * (rng.random((9, 40)) < 0.7)
    adata = ad.AnnData(counts.copy())
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    expected = np.asarray(adata.X, dtype=np.float64)
    expected_depth = np.log10(expected.sum(axis=1))

    target_sum = bulk_target_sum(counts.sum(axis=1))
    # cut into blocks: the median of the whole input is what every block is scaled to
    parts = [normalize_bulk(counts[a:b], target_sum=target_sum, pre_normalized="F") for a, b in ((0, 4), (4, 9))]
    normalised = sp.vstack([p[0] for p in parts]).toarray()
    target = np.concatenate([p[1] for p in parts])
    source = np.concatenate([p[2] for p in parts])
    np.testing.assert_array_equal(normalised, expected.astype(np.float32))
    np.testing.assert_array_equal(target, expected_depth.astype(np.float32))
    np.testing.assert_array_equal(source, target)


def test_bulk_refuses_what_the_released_script_does_not_define():
    with pytest.raises(ScfmError, match="bulk input takes pre_normalized F"):
        normalize_bulk(np.ones((2, 3)), pre_normalized="A")
    with pytest.raises(ScfmError, match="total expression <= 0"):
        normalize_bulk(np.array([[1.0, -3.0]]), pre_normalized="T")
    with pytest.raises(ScfmError, match="median total"):
        normalize_bulk(np.ones((2, 3)), pre_normalized="F")


def test_bulk_embedding_ignores_target_depth_and_block_size():
    rng = np.random.default_rng(1)
    counts = sp.csr_matrix(rng.poisson(3.0, size=(12, 30)).astype(np.float32))
    model = XTrimoGene(ModelConfig.preset("tiny", n_genes=30), seed=2).eval()
    a = embed_cells(model, counts, input_type="bulk", target_depth="t4", device="cpu")
    b = embed_cells(model, counts, input_type="bulk", target_depth="a5", device="cpu", chunk_size=5, batch_size=3)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    single = embed_cells(model, counts, input_type="singlecell", device="cpu")
    assert np.abs(a - single).max() > 1e-3  # different tokens, different embedding


def test_embed_cli_records_bulk_input(tmp_path):
    rng = np.random.default_rng(3)
    genes = [f"G{i}" for i in range(25)]
    vocab = Vocabulary(genes)
    config = ModelConfig.preset("tiny", n_genes=len(genes))
    save_checkpoint(tmp_path / "ckpt", XTrimoGene(config, seed=5), config, vocab)
    # bulk expression in vocabulary order, not integer (e.g. TPM): already aligned, so no count check applies
    bulk = ad.AnnData(rng.gamma(1.0, 30.0, size=(6, 25)).astype(np.float32))
    bulk.var_names = genes
    bulk.obs_names = [f"line{i}" for i in range(6)]
    bulk.X = sp.csr_matrix(bulk.X)
    bulk.write_h5ad(tmp_path / "bulk.h5ad")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "bulk.embedded.h5ad"
    result = CliRunner().invoke(cli, ["embed", str(tmp_path / "bulk.h5ad"), "-o", str(out), "--checkpoint",
                                      str(tmp_path / "ckpt"), "--input-type", "bulk", "--precision", "fp32",
                                      "--quiet", "--mlflow-uri", uri])
    assert result.exit_code == 0, result.output
    embedded = ad.read_h5ad(out)
    settings = embedded.uns["scfm"]["embed"]
    assert settings["input_type"] == "bulk" and settings["target_depth"] == "T=S"
    with h5py.File(tmp_path / "bulk.h5ad") as handle:
        assert handle["X/data"].dtype == np.float32
    expected = embed_cells(XTrimoGene(config, seed=5).eval(), sp.csr_matrix(bulk.X), input_type="bulk", device="cpu")
    np.testing.assert_allclose(embedded.obsm["X_scfm"], expected, atol=1e-5, rtol=0)

    bad = CliRunner().invoke(cli, ["embed", str(tmp_path / "bulk.h5ad"), "-o", str(tmp_path / "a.h5ad"),
                                   "--checkpoint", str(tmp_path / "ckpt"), "--input-type", "bulk",
                                   "--pre-normalized", "A", "--quiet", "--mlflow-uri", uri])
    assert bad.exit_code == 2 and "error: bulk input takes pre_normalized F" in bad.output
    assert not (tmp_path / "a.h5ad").exists()
