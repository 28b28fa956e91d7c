"""scfm annotate: kNN transfer from a frozen reference, the unknown threshold, and every error path."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.neighbors import KNeighborsClassifier

from scfm.cli import cli
from scfm.tasks.annotate import UNKNOWN

LABEL_KEY = "bulk_labels"


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def ref_and_query(embedded_pbmc, tmp_path):
    """Even cells form the labelled reference, odd cells an unlabelled query batch."""
    _, adata = embedded_pbmc
    reference = adata[::2].copy()
    query = adata[1::2].copy()
    truth = query.obs.pop(LABEL_KEY).astype(str).to_numpy()
    ref_path, query_path = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    reference.write_h5ad(ref_path)
    query.write_h5ad(query_path)
    return ref_path, query_path, reference, query, truth


def test_knn_transfer_writes_the_documented_schema(ref_and_query, tmp_path, scfm_bin):
    ref_path, query_path, reference, query, truth = ref_and_query
    out = tmp_path / "out" / "query.annotated.h5ad"
    scfm_bin("annotate", query_path, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
             "--k", 10, "--min-confidence", 0.0, "--mlflow-uri", f"sqlite:///{tmp_path}/mlflow.db")
    result = ad.read_h5ad(out)
    classes = list(result.uns["scfm"]["annotate"]["classes"])
    assert classes == sorted(reference.obs[LABEL_KEY].astype(str).unique())
    probabilities = result.obsm["scfm_probabilities"]
    assert probabilities.shape == (query.n_obs, len(classes))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # the same transfer, done directly with scikit-learn, gives the same labels
    knn = KNeighborsClassifier(n_neighbors=10).fit(reference.obsm["X_scfm"], reference.obs[LABEL_KEY].astype(str))
    expected = knn.predict(query.obsm["X_scfm"])
    assert (result.obs["scfm_cell_type"].astype(str).to_numpy() == expected).all()
    np.testing.assert_allclose(result.obs["scfm_confidence"], probabilities.max(axis=1), atol=1e-6)
    # real PBMC structure: transferred labels mostly agree with the held-out truth
    assert (expected == truth).mean() > 0.6
    assert result.uns["scfm"]["annotate"]["method"] == "knn"
    assert result.uns["scfm"]["embed"]["checkpoint_sha256"] == "pca-stand-in"  # upstream provenance kept

    from mlflow.tracking import MlflowClient

    runs = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(["1"])
    assert [r.data.tags["scfm.step"] for r in runs] == ["annotate"]
    assert runs[0].data.metrics["n_cells"] == query.n_obs


def test_low_confidence_cells_become_unknown(ref_and_query, tmp_path, shared_store):
    ref_path, query_path, *_ = ref_and_query
    outputs = {}
    for threshold in (0.0, 0.9):
        out = tmp_path / f"t{threshold}.h5ad"
        result = run_cli("annotate", query_path, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
                         "--min-confidence", threshold, "--quiet", "--mlflow-uri", shared_store)
        assert result.exit_code == 0, result.output
        outputs[threshold] = ad.read_h5ad(out)
    loose, strict = outputs[0.0], outputs[0.9]
    assert (loose.obs["scfm_cell_type"].astype(str) != UNKNOWN).all()
    low = strict.obs["scfm_confidence"].to_numpy() < 0.9
    assert low.any() and (~low).any(), "the threshold should split these cells"
    strict_types = strict.obs["scfm_cell_type"].astype(str).to_numpy()
    assert (strict_types[low] == UNKNOWN).all()
    assert (strict_types[~low] == loose.obs["scfm_cell_type"].astype(str).to_numpy()[~low]).all()
    assert strict.uns["scfm"]["annotate"]["n_unknown"] == int(low.sum())


def _assert_fails(result, *fragments, output):
    assert result.exit_code != 0
    for fragment in fragments:
        assert fragment in result.output, result.output
    assert "Traceback" not in result.output
    assert not output.exists()
    assert not list(output.parent.glob(f".{output.name}*")), "no temporary left behind"


def test_missing_embedding_is_refused(ref_and_query, tmp_path, shared_store):
    ref_path, _, _, query, _ = ref_and_query
    del query.obsm["X_scfm"]
    bare = tmp_path / "bare.h5ad"
    query.write_h5ad(bare)
    out = tmp_path / "o.h5ad"
    result = run_cli("annotate", bare, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {bare}: no embedding obsm['X_scfm']", output=out)


def test_missing_label_key_is_refused(ref_and_query, tmp_path, shared_store):
    ref_path, query_path, *_ = ref_and_query
    out = tmp_path / "o.h5ad"
    result = run_cli("annotate", query_path, "-o", out, "--reference", ref_path, "--label-key", "no_such_column",
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {ref_path}: --label-key 'no_such_column' is not an obs column", output=out)


def test_dimension_mismatch_is_refused(ref_and_query, tmp_path, shared_store):
    ref_path, _, _, query, _ = ref_and_query
    query.obsm["X_scfm"] = query.obsm["X_scfm"][:, :7]
    narrow = tmp_path / "narrow.h5ad"
    query.write_h5ad(narrow)
    out = tmp_path / "o.h5ad"
    result = run_cli("annotate", narrow, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {ref_path}: embedding dimension mismatch", "has 20 dims, the query has 7",
                  output=out)


def test_reference_from_another_checkpoint_is_refused(ref_and_query, tmp_path, shared_store):
    ref_path, _, _, query, _ = ref_and_query
    query.uns["scfm"]["embed"]["checkpoint_sha256"] = "another-model"
    other = tmp_path / "other.h5ad"
    query.write_h5ad(other)
    out = tmp_path / "o.h5ad"
    result = run_cli("annotate", other, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {ref_path}: reference was embedded with a different checkpoint",
                  "checkpoint_sha256", output=out)


def test_exactly_one_source_of_labels(ref_and_query, tmp_path, shared_store):
    ref_path, query_path, *_ = ref_and_query
    out = tmp_path / "o.h5ad"
    neither = run_cli("annotate", query_path, "-o", out, "--mlflow-uri", shared_store)
    assert neither.exit_code == 2
    _assert_fails(neither, "exactly one of --classifier or --reference", output=out)
    unlabeled = run_cli("annotate", query_path, "-o", out, "--reference", ref_path,
                        "--mlflow-uri", shared_store)
    _assert_fails(unlabeled, "--reference needs --label-key", output=out)


def test_unreadable_input_is_refused(ref_and_query, tmp_path, shared_store):
    ref_path, *_ = ref_and_query
    junk = tmp_path / "junk.h5ad"
    junk.write_text("not hdf5")
    out = tmp_path / "o.h5ad"
    result = run_cli("annotate", junk, "-o", out, "--reference", ref_path, "--label-key", LABEL_KEY,
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {junk}: cannot read as h5ad", output=out)


@pytest.mark.slow
def test_classifier_head_annotation(demo_run, tmp_path, shared_store):
    from scfm.train.finetune import load_classifier, predict_proba

    out = demo_run["out"]
    embedded = out / "embedded" / "pbmc_b.embedded.h5ad"
    target = tmp_path / "b.annotated.h5ad"
    result = run_cli("annotate", embedded, "-o", target, "--classifier", out / "classifier", "--min-confidence", 0.3,
                     "--quiet", "--mlflow-uri", shared_store)
    assert result.exit_code == 0, result.output
    annotated = ad.read_h5ad(target)
    classifier = load_classifier(out / "classifier")
    assert list(annotated.uns["scfm"]["annotate"]["classes"]) == classifier.labels
    expected = predict_proba(classifier, ad.read_h5ad(embedded).obsm["X_scfm"])
    np.testing.assert_allclose(annotated.obsm["scfm_probabilities"], expected, rtol=1e-5, atol=1e-6)
    best = np.asarray(classifier.labels)[expected.argmax(axis=1)]
    called = np.where(expected.max(axis=1) >= 0.3, best, UNKNOWN)
    assert (annotated.obs["scfm_cell_type"].astype(str).to_numpy() == called).all()
    assert annotated.uns["scfm"]["annotate"]["method"] == "classifier"


@pytest.mark.slow
def test_classifier_refuses_embeddings_made_differently(demo_run, tmp_path, shared_store):
    out = demo_run["out"]
    adata = ad.read_h5ad(out / "embedded" / "pbmc_b.embedded.h5ad")
    adata.uns["scfm"]["embed"]["pool"] = "max"
    other = tmp_path / "max_pool.h5ad"
    adata.write_h5ad(other)
    target = tmp_path / "o.h5ad"
    result = run_cli("annotate", other, "-o", target, "--classifier", out / "classifier",
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {other}: the input was embedded with other settings", "pool", output=target)

    del adata.uns["scfm"]["embed"]
    adata.obsm["X_scfm"] = adata.obsm["X_scfm"][:, :16]
    narrow = tmp_path / "narrow.h5ad"
    adata.write_h5ad(narrow)
    result = run_cli("annotate", narrow, "-o", target, "--classifier", out / "classifier",
                     "--mlflow-uri", shared_store)
    _assert_fails(result, f"error: {narrow}: embedding dimension mismatch", output=target)
