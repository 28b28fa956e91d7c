"""scfm annotate reads an embedding only when it is sure what made it: the classifier's weights and
vocabulary, finite values; a damaged classifier is one error line."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

from scfm.cli import cli
from scfm.data.vocab import Vocabulary
from scfm.model import ModelConfig, XTrimoGene
from scfm.model.checkpoint import checkpoint_sha256, save_checkpoint

LABEL_KEY = "bulk_labels"


def run(*args, store):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--mlflow-uri", store, "--quiet"],
                                catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def classifiers(train_data, tmp_path_factory):
    """A frozen and a partly unfrozen classifier from the same tiny checkpoint, and 60 cells to annotate."""
    from scfm.train.finetune import FinetuneSettings, finetune

    root = tmp_path_factory.mktemp("annotate_checks")
    store = f"sqlite:///{root / 'mlflow.db'}"
    aligned = ad.read_h5ad(train_data["aligned"])
    training = root / "training.aligned.h5ad"
    aligned[:240].copy().write_h5ad(training)  # enough for a split; what is tested is the bookkeeping
    made = {}
    for name, unfreeze in (("frozen", 0), ("unfrozen", 1)):
        made[name] = root / name
        finetune(FinetuneSettings(input_path=str(training), out_dir=str(made[name]),
                                  checkpoint=str(train_data["checkpoint"]), label_key=LABEL_KEY, epochs=1,
                                  unfreeze_layers=unfreeze, seed=0, quiet=True, mlflow_uri=store))
    cells = root / "cells.aligned.h5ad"
    aligned[-60:].copy().write_h5ad(cells)
    return {"root": root, "store": store, "cells": cells, **made}


def embed(classifiers, checkpoint, name):
    out = classifiers["root"] / f"{name}.embedded.h5ad"
    if not out.exists():
        code, output = run("embed", classifiers["cells"], "-o", out, "--checkpoint", checkpoint,
                           store=classifiers["store"])
        assert code == 0, output
    return out


def annotate(classifiers, embedded, tmp_path, *source):
    out = tmp_path / "annotated.h5ad"
    code, output = run("annotate", embedded, "-o", out, *source, store=classifiers["store"])
    return code, output, out


def assert_one_error(code, output, out, path, message):
    assert code == 1, output
    (line,) = output.strip().splitlines()
    assert line.startswith(f"error: {path}: ") and message in line, line
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


def test_the_classifier_records_the_weights_that_embed_records(classifiers, train_data):
    for name in ("frozen", "unfrozen"):
        labels = json.loads((classifiers[name] / "labels.json").read_text())
        # what `scfm embed --checkpoint <classifier>` records, so the pipeline's fine-tune mode matches
        assert labels["checkpoint_sha256"] == checkpoint_sha256(classifiers[name])
        assert labels["source_checkpoint_sha256"] == checkpoint_sha256(train_data["checkpoint"])
        assert labels["vocab_sha256"] == train_data["vocab_obj"].sha256


@pytest.mark.parametrize("classifier, checkpoint", [
    ("frozen", "classifier"), ("frozen", "source"), ("unfrozen", "classifier"),
])
def test_embeddings_from_the_classifiers_encoder_are_annotated(classifiers, train_data, tmp_path, classifier,
                                                              checkpoint):
    weights = classifiers[classifier] if checkpoint == "classifier" else train_data["checkpoint"]
    embedded = embed(classifiers, weights, f"{classifier}-{checkpoint}")
    code, output, out = annotate(classifiers, embedded, tmp_path, "--classifier", classifiers[classifier])
    assert code == 0, output
    assert ad.read_h5ad(out).obs["scfm_cell_type"].notna().all()


def test_embeddings_from_other_weights_are_refused(classifiers, train_data, tmp_path):
    vocab = train_data["vocab_obj"]
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    other = save_checkpoint(classifiers["root"] / "other_weights", XTrimoGene(config, seed=99), config, vocab)
    for embedded, classifier in ((embed(classifiers, other, "other"), "frozen"),
                                 # fine-tuned encoder layers changed: the starting checkpoint no longer fits
                                 (embed(classifiers, train_data["checkpoint"], "unfrozen-source"), "unfrozen")):
        code, output, out = annotate(classifiers, embedded, tmp_path, "--classifier", classifiers[classifier])
        assert_one_error(code, output, out, embedded, "was embedded with other weights than the classifier was "
                                                      "trained on (checkpoint_sha256")


def test_embeddings_with_another_gene_order_are_refused(classifiers, train_data, tmp_path):
    # the same weight file with the genes in another order: same checkpoint_sha256, other vocabulary
    reordered = shutil.copytree(train_data["checkpoint"], classifiers["root"] / "reordered")
    genes = list(reversed(train_data["vocab_obj"].genes))
    Vocabulary(genes).save(reordered / "vocab.tsv")
    meta = json.loads((reordered / "config.json").read_text())
    meta["vocab_sha256"] = Vocabulary(genes).sha256
    (reordered / "config.json").write_text(json.dumps(meta))
    embedded = embed(classifiers, reordered, "reordered")
    code, output, out = annotate(classifiers, embedded, tmp_path, "--classifier", classifiers["frozen"])
    assert_one_error(code, output, out, embedded, "was embedded with another vocabulary than the classifier's")


def test_embeddings_without_settings_are_refused(classifiers, train_data, tmp_path):
    adata = ad.read_h5ad(embed(classifiers, train_data["checkpoint"], "frozen-source"))
    del adata.uns["scfm"]["embed"]
    bare = tmp_path / "bare.h5ad"
    adata.write_h5ad(bare)
    code, output, out = annotate(classifiers, bare, tmp_path, "--classifier", classifiers["frozen"])
    assert_one_error(code, output, out, bare, "has no uns['scfm']['embed'] settings")


def test_a_truncated_classifier_head_is_one_line(classifiers, train_data, tmp_path):
    broken = shutil.copytree(classifiers["frozen"], tmp_path / "broken")
    head = broken / "head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    embedded = embed(classifiers, train_data["checkpoint"], "frozen-source")
    code, output, out = annotate(classifiers, embedded, tmp_path, "--classifier", broken)
    assert_one_error(code, output, out, head, "unreadable classifier head")


@pytest.mark.parametrize("where", ["query, classifier", "query, kNN", "reference, kNN"])
def test_nan_embeddings_are_one_line(classifiers, train_data, tmp_path, where):
    good = embed(classifiers, train_data["checkpoint"], "frozen-source")
    adata = ad.read_h5ad(good)
    adata.obsm["X_scfm"][7, 3] = np.nan
    bad = tmp_path / "nan.h5ad"
    adata.write_h5ad(bad)
    if where == "query, classifier":
        source, query, named = ["--classifier", classifiers["frozen"]], bad, bad
    elif where == "query, kNN":
        source, query, named = ["--reference", good, "--label-key", LABEL_KEY], bad, bad
    else:
        source, query, named = ["--reference", bad, "--label-key", LABEL_KEY], good, bad
    code, output, out = annotate(classifiers, query, tmp_path, *source)
    assert_one_error(code, output, out, named, "obsm['X_scfm'] holds NaN or infinite values in 1 of 60 cells "
                                               "(first: row 7)")
