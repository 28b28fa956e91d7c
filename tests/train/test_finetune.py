"""Fine-tuning on the 700 real labelled PBMCs: real split, real metrics, real MLflow stores."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

LABEL_KEY = "bulk_labels"


@pytest.fixture(scope="module")
def frozen_run(train_data, tmp_path_factory):
    """One frozen-encoder fine-tune through the real executable, shared by the checks below."""
    from train_helpers import BIN

    root = tmp_path_factory.mktemp("finetune")
    out = root / "classifier"
    proc = subprocess.run(
        [sys.executable, str(BIN / "scfm-finetune"), train_data["aligned"], "-o", out,
         "--checkpoint", train_data["checkpoint"], "--label-key", LABEL_KEY, "--epochs", "15", "--seed", "1",
         "--precision", "fp32", "--quiet"],  # fp32: the head is compared exactly with embed's fp32 output
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root, out


def test_classifier_directory_and_held_out_metrics(frozen_run, pbmc_counts):
    _, out = frozen_run
    for name in ("config.json", "model.safetensors", "vocab.tsv", "labels.json", "head.safetensors",
                 "metrics.json", "split.csv"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    split = pd.read_csv(out / "split.csv")
    labels = pbmc_counts.obs[LABEL_KEY].astype(str)

    # stratified: every class in every part, sizes as asked, the same cells and labels as the input
    assert sorted(split["cell_id"]) == sorted(pbmc_counts.obs_names)
    assert (split.set_index("cell_id")["label"].loc[pbmc_counts.obs_names].to_numpy() == labels.to_numpy()).all()
    for part in ("train", "val", "test"):
        assert set(split.loc[split["split"] == part, "label"]) == set(labels)
    assert abs((split["split"] == "test").mean() - 0.2) < 0.01
    assert metrics["split_sizes"]["test"] == metrics["test"]["n_cells"] == metrics["baseline"]["n_cells"]

    # both methods beat always answering the most common class of the training cells
    test_labels = split.loc[split["split"] == "test", "label"]
    majority = (test_labels == split.loc[split["split"] == "train", "label"].mode()[0]).mean()
    assert metrics["test"]["accuracy"] > majority + 0.1
    assert metrics["baseline"]["accuracy"] > majority + 0.1
    assert 0 < metrics["test"]["macro_f1"] <= 1 and 0 < metrics["baseline"]["macro_f1"] <= 1
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 15
    assert metrics["precision"] == "fp32" and metrics["precision_reason"] == "requested fp32"


def test_head_applies_to_scfm_embed_output(frozen_run, train_data, pbmc_counts):
    """annotate's path: embed with the checkpoint (embed's defaults), then load_classifier + predict_proba."""
    from scfm.tasks.embed import embed_cells
    from scfm.train.finetune import load_classifier, predict_proba

    _, out = frozen_run
    classifier = load_classifier(out)
    model, head, labels, config = classifier
    assert labels == sorted(set(pbmc_counts.obs[LABEL_KEY].astype(str)))
    split = pd.read_csv(out / "split.csv").set_index("cell_id").loc[pbmc_counts.obs_names]
    test = (split["split"] == "test").to_numpy()
    embeddings = embed_cells(model, pbmc_counts.X[np.flatnonzero(test)], device="cpu", precision="fp32")
    assert embeddings.shape[1] == classifier.embedding_dim
    probabilities = predict_proba(classifier, embeddings)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    predicted = np.asarray(labels)[probabilities.argmax(axis=1)]
    accuracy = (predicted == split.loc[test, "label"].to_numpy()).mean()
    assert accuracy == pytest.approx(json.loads((out / "metrics.json").read_text())["test"]["accuracy"], abs=1e-9)


def test_run_is_in_the_default_sqlite_store(frozen_run):
    from mlflow.tracking import MlflowClient

    root, out = frozen_run
    metrics = json.loads((out / "metrics.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("scfm").experiment_id],
                                filter_string="tags.`scfm.step` = 'finetune'")
    assert run.info.status == "FINISHED"
    assert run.data.params["label_key"] == LABEL_KEY
    assert run.data.metrics["test_macro_f1"] == pytest.approx(metrics["test"]["macro_f1"])
    assert run.data.metrics["baseline_accuracy"] == pytest.approx(metrics["baseline"]["accuracy"])
    epochs = client.get_metric_history(run.info.run_id, "val_macro_f1")
    assert len(epochs) == metrics["epochs_run"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "split.csv", "labels.json", "classifier"} <= artifacts


@pytest.mark.slow
def test_unfrozen_last_layer_logged_to_an_mlflow_server(train_data, tmp_path, mlflow_server):
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from scfm.train.finetune import FinetuneSettings, finetune

    import anndata as ad

    # every fourth cell: gradients through the encoder cost far more than the frozen path
    subset = tmp_path / "subset.aligned.h5ad"
    ad.read_h5ad(train_data["aligned"])[::4].copy().write_h5ad(subset)
    out = tmp_path / "classifier"
    metrics = finetune(FinetuneSettings(
        input_path=str(subset), out_dir=str(out), checkpoint=str(train_data["checkpoint"]),
        label_key=LABEL_KEY, unfreeze_layers=1, epochs=2, quiet=True, mlflow_uri=mlflow_server,
    ))
    # the last encoder layer trained, the first one and the decoder did not
    before = load_file(str(train_data["checkpoint"] / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("encoder.1.") for k in changed)
    assert not any(k.startswith(("encoder.0.", "decoder.", "value_embed.")) for k in changed)
    assert json.loads((out / "labels.json").read_text())["unfreeze_layers"] == 1

    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["unfreeze_layers"] == "1"
    assert run.data.metrics["test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "classifier"}
    assert not (tmp_path / "mlflow.db").exists()  # the server, not the default store


def test_finetune_starts_from_an_official_style_ckpt(train_data, tmp_path):
    """The released file layout (random weights here) with --vocab, encoder frozen."""
    from scfm.model.checkpoint import load_checkpoint, write_official_style_checkpoint
    from scfm.train.finetune import FinetuneSettings, finetune, load_classifier

    config = load_checkpoint(train_data["checkpoint"]).config
    ckpt = write_official_style_checkpoint(tmp_path / "models.ckpt", config, seed=2, versions=("cell",))
    out = tmp_path / "classifier"
    metrics = finetune(FinetuneSettings(
        input_path=str(train_data["aligned"]), out_dir=str(out), checkpoint=str(ckpt), ckpt_version="ce",
        vocab=str(train_data["vocab"]), label_key=LABEL_KEY, epochs=3, quiet=True,
    ))
    assert metrics["test"]["n_cells"] == metrics["split_sizes"]["test"]
    classifier = load_classifier(out)
    assert classifier.config["source_checkpoint"].startswith("official:")
    assert classifier.model.config == config


def test_load_classifier_names_what_is_missing(frozen_run, tmp_path):
    import shutil

    from scfm.errors import ScfmError
    from scfm.train.finetune import load_classifier

    _, out = frozen_run
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "head.safetensors").unlink()
    with pytest.raises(ScfmError, match="head.safetensors is missing"):
        load_classifier(broken)


def test_several_inputs_train_on_their_labelled_cells(train_data, pbmc_counts, tmp_path):
    """Two samples as a pipeline hands them over: one without the label column, one partly labelled."""
    import anndata as ad

    from scfm.train.finetune import FinetuneSettings, finetune

    aligned = ad.read_h5ad(train_data["aligned"])
    first, second = aligned[:250].copy(), aligned[250:].copy()
    del first.obs[LABEL_KEY]
    labels = second.obs[LABEL_KEY].astype(object)
    labels.iloc[::10] = np.nan
    second.obs[LABEL_KEY] = labels
    paths = [tmp_path / "pbmc_a.aligned.h5ad", tmp_path / "pbmc_b.aligned.h5ad"]
    first.write_h5ad(paths[0])
    second.write_h5ad(paths[1])
    out = tmp_path / "classifier"
    metrics = finetune(FinetuneSettings(
        input_path=[str(p) for p in paths], out_dir=str(out), checkpoint=str(train_data["checkpoint"]),
        label_key=LABEL_KEY, epochs=2, seed=0, quiet=True, mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        min_cells_per_class=20,  # every kept class then reaches each of train / val / test
    ))

    known = second.obs[LABEL_KEY].notna().to_numpy()
    split = pd.read_csv(out / "split.csv")
    assert list(split.columns) == ["cell_id", "input", "label", "split"]
    assert set(split["input"]) == {"pbmc_b.aligned.h5ad"}
    kept_classes = set(split["label"])
    expected = second.obs_names[known][second.obs[LABEL_KEY][known].astype(str).isin(kept_classes)]
    assert sorted(split["cell_id"]) == sorted(expected)
    assert sum(metrics["dropped_rare_classes"].values()) == int(known.sum()) - len(split)
    for part in ("train", "val", "test"):
        assert set(split.loc[split["split"] == part, "label"]) == kept_classes
    assert metrics["n_unlabelled"] == first.n_obs + int((~known).sum())
    assert metrics["inputs"] == [
        {"input": "pbmc_a.aligned.h5ad", "n_cells": first.n_obs, "n_labelled": 0, "has_label_column": False},
        {"input": "pbmc_b.aligned.h5ad", "n_cells": second.n_obs, "n_labelled": int(known.sum()),
         "has_label_column": True},
    ]
    assert sum(metrics["split_sizes"].values()) == len(split) == sum(metrics["classes"].values())
    assert json.loads((out / "metrics.json").read_text())["inputs"] == metrics["inputs"]
