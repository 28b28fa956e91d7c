"""``scfm align`` and ``scfm vocab build`` through the CLI: outputs, MLflow run, every error path."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scfm.cli import cli
from scfm.data.align import align_adata
from scfm.data.shards import ShardDataset, read_manifest
from scfm.data.vocab import Vocabulary


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite MLflow store for the module (creating a store costs seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, pbmc_counts):
    """pbmc counts as an h5ad with a sample column, and a vocabulary of every second gene plus extras."""
    root = tmp_path_factory.mktemp("inputs")
    adata = pbmc_counts.copy()
    adata.obs["sample"] = pd.Categorical(["pbmc"] * adata.n_obs)
    adata.obs_names = [f"pbmc_{b}" for b in adata.obs_names]
    adata.write_h5ad(root / "pbmc.h5ad")
    genes = list(adata.var_names)
    vocab = Vocabulary(["EXTRA1"] + genes[::2] + ["EXTRA2"])
    vocab.save(root / "vocab.tsv")
    return root, adata, vocab


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_align_writes_h5ad_shards_coverage_and_mlflow_run(tmp_path, inputs, store):
    root, adata, vocab = inputs
    out, shards = tmp_path / "pbmc.aligned.h5ad", tmp_path / "pbmc.shards"
    result = invoke("align", root / "pbmc.h5ad", "-o", out, "--vocab", root / "vocab.tsv", "--shards-dir", shards,
                    "--cells-per-shard", 300, "--chunk-size", 97, "--mlflow-uri", store, "--quiet")
    assert result.exit_code == 0, result.output

    expected, expected_cov = align_adata(adata, vocab)  # the in-memory path gives the same file
    aligned = ad.read_h5ad(out)
    assert list(aligned.var_names) == vocab.genes
    assert list(aligned.obs_names) == list(adata.obs_names)
    assert sp.issparse(aligned.X) and aligned.X.dtype == np.float32
    assert (aligned.X != expected.X).nnz == 0
    assert aligned.obs["sample"].tolist() == adata.obs["sample"].tolist()
    scfm = aligned.uns["scfm"]
    assert scfm["vocab_sha256"] == vocab.sha256 and scfm["counts_source"] == "X"
    assert scfm["coverage"]["fraction_counts_kept"] == pytest.approx(expected_cov["fraction_counts_kept"])

    coverage = json.loads((tmp_path / "pbmc.aligned.coverage.json").read_text())
    dense = adata.X.toarray()
    assert coverage["fraction_counts_kept"] == pytest.approx(dense[:, ::2].sum() / dense.sum(), rel=1e-6)
    assert coverage["vocab_genes_present"] == len(vocab) - 2

    manifest = read_manifest(shards)
    assert manifest["n_cells"] == adata.n_obs and [s["n_cells"] for s in manifest["shards"]] == [300, 300, 100]
    assert manifest["vocab_sha256"] == vocab.sha256 and manifest["obs_columns"] == ["sample"]
    cells = list(ShardDataset(shards, shuffle=False, loop=False))
    assert [c["cell_id"] for c in cells] == list(adata.obs_names)
    np.testing.assert_array_equal(cells[5]["gene_ids"], expected.X[5].indices)
    np.testing.assert_array_equal(cells[5]["counts"], expected.X[5].data)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs(
        [client.get_experiment_by_name("scfm").experiment_id],
        filter_string=f"params.output = '{out}'",
    )
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["vocab_sha256"] == vocab.sha256
    assert runs[0].data.metrics["fraction_counts_kept"] == pytest.approx(coverage["fraction_counts_kept"])
    assert runs[0].data.metrics["n_cells"] == adata.n_obs
    artifacts = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"pbmc.aligned.coverage.json", "manifest.json"} <= artifacts


def test_align_with_aliases_and_shards_only(tmp_path, inputs, store):
    root, adata, vocab = inputs
    gene = adata.var_names[1]  # odd position: not in the vocabulary under its own name
    renamed = Vocabulary(vocab.genes + [f"{gene}-OFFICIAL"])
    renamed.save(tmp_path / "v.tsv")
    (tmp_path / "aliases.tsv").write_text(f"alias\tgene_name\n{gene}\t{gene}-OFFICIAL\n")
    result = invoke("align", root / "pbmc.h5ad", "--vocab", tmp_path / "v.tsv", "--aliases", tmp_path / "aliases.tsv",
                    "--shards-dir", tmp_path / "s", "--mlflow-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    coverage = json.loads((tmp_path / "s.coverage.json").read_text())
    assert coverage["matched_by_rule"]["alias"] == 1
    token = renamed.index_of(f"{gene}-OFFICIAL")
    first = next(iter(ShardDataset(tmp_path / "s", shuffle=False, loop=False)))
    value = adata.X[0, 1]
    assert (token in first["gene_ids"]) == (value > 0)


def write_h5ad(path, X, genes):
    ad.AnnData(X=sp.csr_matrix(np.asarray(X, dtype=np.float32)),
               obs=pd.DataFrame(index=[f"c{i}" for i in range(len(X))]),
               var=pd.DataFrame(index=genes)).write_h5ad(path)
    return path


def bad_inputs(tmp_path, root):
    """name → (args after INPUT, input path, expected message)."""
    mouse = write_h5ad(tmp_path / "mouse.h5ad", [[1, 2], [3, 4]], ["ENSMUSG00000029580", "ENSMUSG00000000001"])
    vocab = Vocabulary.load(root / "vocab.tsv")
    mostly_unknown = write_h5ad(tmp_path / "low.h5ad", [[1, 50], [2, 60]], [vocab.genes[1], "NOT_IN_VOCAB"])
    logged = write_h5ad(tmp_path / "logged.h5ad", [[0.5, 1.2], [0.0, 2.7]], vocab.genes[1:3])
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"\x00not an hdf5 file at all")
    dup_vocab = tmp_path / "dup.tsv"
    dup_vocab.write_text("gene_name\nA\nA\n")
    no_col_alias = tmp_path / "alias.tsv"
    no_col_alias.write_text("from\tto\nX\tY\n")
    good = root / "pbmc.h5ad"
    return {
        "missing-input": (tmp_path / "nope.h5ad", [], "file not found"),
        "not-hdf5": (junk, [], "not an HDF5 file"),
        "zero-overlap": (mouse, [], "no gene overlaps the vocabulary"),
        "low-coverage": (mostly_unknown, [], f"coverage {3 / 113:.3f} is below --min-coverage 0.3"),
        "not-counts": (logged, [], "non-integer values where raw counts are required"),
        "missing-vocab": (good, ["--vocab", tmp_path / "none.tsv"], "vocabulary file not found"),
        "duplicate-vocab": (good, ["--vocab", dup_vocab], "duplicate gene name 'A'"),
        "bad-aliases": (good, ["--aliases", no_col_alias], "missing column(s) alias, gene_name"),
        "missing-layer": (good, ["--layer", "spliced"], "layer 'spliced' not found"),
    }


@pytest.mark.parametrize(
    "case",
    ["missing-input", "not-hdf5", "zero-overlap", "low-coverage", "not-counts", "missing-vocab", "duplicate-vocab",
     "bad-aliases", "missing-layer"],
)
def test_align_errors_leave_no_output(tmp_path, inputs, store, case):
    root, _, _ = inputs
    path, extra, message = bad_inputs(tmp_path, root)[case]
    args = ["--vocab", root / "vocab.tsv", *extra] if "--vocab" not in extra else extra
    out = tmp_path / "out" / "x.h5ad"
    result = invoke("align", path, "-o", out, "--shards-dir", tmp_path / "out" / "shards", *args,
                    "--mlflow-uri", store, "--quiet")
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.output
    produced = sorted(p.name for p in (tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert produced == []


def test_align_needs_an_output(inputs, store):
    root, _, _ = inputs
    result = invoke("align", root / "pbmc.h5ad", "--vocab", root / "vocab.tsv", "--mlflow-uri", store)
    assert result.exit_code == 2
    assert "give -o OUT.h5ad and/or --shards-dir DIR" in result.output


def test_min_coverage_flag_lowers_the_bar(tmp_path, inputs, store):
    root, _, _ = inputs
    vocab = Vocabulary.load(root / "vocab.tsv")
    low = write_h5ad(tmp_path / "low.h5ad", [[1, 50], [2, 60]], [vocab.genes[1], "NOT_IN_VOCAB"])
    result = invoke("align", low, "-o", tmp_path / "x.h5ad", "--vocab", root / "vocab.tsv", "--min-coverage", 0.01,
                    "--mlflow-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    assert ad.read_h5ad(tmp_path / "x.h5ad").X.sum() == 3


def test_vocab_build_cli(tmp_path, inputs, store):
    root, adata, _ = inputs
    out = tmp_path / "vocab.tsv"
    result = invoke("vocab", "build", root / "pbmc.h5ad", "-o", out, "--min-cells", 50, "--mlflow-uri", store, "--quiet")
    assert result.exit_code == 0, result.output
    vocab = Vocabulary.load(out)
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    expected = sorted((g for g, n in zip(adata.var_names, detected) if n >= 50), key=lambda g: (-detected[adata.var_names.get_loc(g)], g))
    assert vocab.genes == expected


def test_vocab_build_error_leaves_no_file(tmp_path, inputs, store):
    root, adata, _ = inputs
    out = tmp_path / "vocab.tsv"
    result = invoke("vocab", "build", root / "pbmc.h5ad", "-o", out, "--min-cells", 100_000, "--mlflow-uri", store)
    assert result.exit_code == 1
    assert "no gene is detected in at least 100000 cells" in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case", ["missing-input", "not-counts"])
def test_vocab_build_bad_input_leaves_no_file(tmp_path, inputs, store, case):
    root, _, _ = inputs
    if case == "missing-input":
        path, message = tmp_path / "nope.h5ad", "file not found"
    else:
        path = write_h5ad(tmp_path / "logged.h5ad", [[0.5, 1.2], [0.0, 2.7]], ["A", "B"])
        message = "non-integer values where raw counts are required"
    out = tmp_path / "out" / "vocab.tsv"
    result = invoke("vocab", "build", root / "pbmc.h5ad", path, "-o", out, "--mlflow-uri", store)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0], result.output
    assert not out.exists()
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
