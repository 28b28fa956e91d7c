"""Vocabulary files: loading (incl. the official scFoundation layout), hashing, saving, building."""

from __future__ import annotations

import hashlib

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scfm.data.vocab import Vocabulary, build_vocabulary
from scfm.errors import ScfmError


def write(path, text):
    path.write_text(text)
    return path


def test_official_layout_loads_as_is(tmp_path):
    # same shape as OS_scRNA_gene_index.19264.tsv: header "gene_name<TAB>index", one gene per row
    genes = [f"GENE{i}" for i in range(19264)]
    lines = ["gene_name\tindex"] + [f"{g}\t{i}" for i, g in enumerate(genes)]
    vocab = Vocabulary.load(write(tmp_path / "OS_scRNA_gene_index.19264.tsv", "\n".join(lines) + "\n"))
    assert len(vocab) == 19264
    assert vocab.genes == genes
    assert vocab.ensembl_ids is None
    assert vocab.index_of("GENE123") == 123


def test_column_order_does_not_matter(tmp_path):
    vocab = Vocabulary.load(write(tmp_path / "v.tsv", "index\tgene_name\n0\tA\n1\tB\n"))
    assert vocab.genes == ["A", "B"]


def test_sha256_is_hash_of_ordered_names_and_ignores_other_columns(tmp_path):
    a = Vocabulary.load(write(tmp_path / "a.tsv", "gene_name\tindex\nTP53\t0\nCD3E\t1\n"))
    b = Vocabulary.load(write(tmp_path / "b.tsv", "gene_name\tensembl_id\nTP53\tENSG00000141510\nCD3E\tENSG00000198851\n"))
    c = Vocabulary(["CD3E", "TP53"])
    assert a.sha256 == b.sha256 == hashlib.sha256(b"TP53\nCD3E\n").hexdigest()
    assert c.sha256 != a.sha256


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary(["A", "B", "C"], ["ENSG00000000001", "", "ENSG00000000003"])
    out = vocab.save(tmp_path / "sub" / "vocab.tsv")
    again = Vocabulary.load(out)
    assert again.genes == vocab.genes and again.ensembl_ids == vocab.ensembl_ids
    assert again.sha256 == vocab.sha256
    assert [p.name for p in out.parent.iterdir()] == ["vocab.tsv"]  # no temporary left


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty vocabulary file"),
        ("\n\n", "empty vocabulary file"),
        ("symbol\tindex\nA\t0\n", "missing column 'gene_name'"),
        ("gene_name\n", "header but no genes"),
        ("gene_name\nA\nB\nA\n", "duplicate gene name 'A'"),
        ("gene_name\tensembl_id\nA\n", "line 2 has 1 fields"),
    ],
)
def test_bad_vocabulary_files(tmp_path, text, message):
    path = write(tmp_path / "bad.tsv", text)
    with pytest.raises(ScfmError, match=message) as info:
        Vocabulary.load(path)
    assert info.value.path == str(path)


def test_missing_file(tmp_path):
    with pytest.raises(ScfmError, match="not found"):
        Vocabulary.load(tmp_path / "nope.tsv")


def _h5ad(path, dense, genes):
    adata = ad.AnnData(
        X=sp.csr_matrix(np.asarray(dense, dtype=np.float32)),
        obs=pd.DataFrame(index=[f"c{i}" for i in range(len(dense))]),
        var=pd.DataFrame(index=genes),
    )
    adata.write_h5ad(path)
    return path


def test_build_counts_cells_across_inputs_and_orders_by_frequency(tmp_path):
    a = _h5ad(tmp_path / "a.h5ad", [[1, 0, 3, 0], [2, 0, 1, 0], [0, 0, 1, 5]], ["G1", "G2", "G3", "G4"])
    b = _h5ad(tmp_path / "b.h5ad", [[0, 4], [0, 1]], ["G1", "G5"])
    # cells with count > 0: G3=3, G1=2, G5=2, G4=1, G2=0
    vocab = build_vocabulary([a, b], min_cells=2, chunk_size=2)
    assert vocab.genes == ["G3", "G1", "G5"]
    assert build_vocabulary([b, a], min_cells=2).sha256 == vocab.sha256  # input order does not matter
    assert build_vocabulary([a, b], min_cells=1).genes == ["G3", "G1", "G5", "G4"]


def test_build_counts_duplicated_symbols_once_per_cell(tmp_path):
    a = _h5ad(tmp_path / "a.h5ad", [[1, 1, 0], [0, 0, 2], [0, 0, 3]], ["G1", "G1", "G2"])
    # G1 is in one cell (twice), G2 in two: counted per column G1 would tie G2 and sort first
    assert build_vocabulary([a], min_cells=1).genes == ["G2", "G1"]


def test_build_fails_when_nothing_passes(tmp_path):
    a = _h5ad(tmp_path / "a.h5ad", [[1, 0], [0, 1]], ["G1", "G2"])
    with pytest.raises(ScfmError, match="no gene is detected in at least 3 cells"):
        build_vocabulary([a], min_cells=3)


def test_build_keeps_ensembl_ids_from_inputs(tmp_path):
    path = tmp_path / "a.h5ad"
    ad.AnnData(
        X=sp.csr_matrix(np.array([[1, 2], [3, 0]], dtype=np.float32)),
        obs=pd.DataFrame(index=["c0", "c1"]),
        var=pd.DataFrame({"gene_ids": ["ENSG00000141510.12", "ENSG00000198851.3"]}, index=["TP53", "CD3E"]),
    ).write_h5ad(path)
    vocab = build_vocabulary([path], min_cells=1)
    assert vocab.genes == ["TP53", "CD3E"]
    assert vocab.ensembl_ids == ["ENSG00000141510", "ENSG00000198851"]
