"""`scfm embed` and `scfm convert` end to end: outputs, MLflow records and every error path."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from scfm.cli import cli
from scfm.data.vocab import Vocabulary
from scfm.model import ModelConfig, XTrimoGene
from scfm.model.checkpoint import load_checkpoint, save_checkpoint, write_official_style_checkpoint
from scfm.tasks.embed import embed_cells


STORE = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pbmc_counts):
    """Raw PBMC counts, a vocabulary (most of their genes + genes they lack), tiny checkpoints."""
    root = tmp_path_factory.mktemp("embed")
    STORE["uri"] = f"sqlite:///{root / 'mlflow.db'}"
    pbmc_counts[:60].copy().write_h5ad(root / "pbmc.h5ad")
    genes = list(pbmc_counts.var_names[:600]) + [f"ABSENT{i}" for i in range(30)]
    vocab = Vocabulary(genes)
    vocab.save(root / "vocab.tsv")
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    save_checkpoint(root / "ckpt", XTrimoGene(config, seed=3), config, vocab)
    write_official_style_checkpoint(root / "models.ckpt", config, seed=4)
    return root


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--mlflow-uri", STORE["uri"]], catch_exceptions=False)
    return result.exit_code, result.output


def _mlflow_runs(db):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("scfm")
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow  # a subprocess that creates a fresh MLflow store: ~10 s alone, more on a busy machine
def test_embed_writes_cells_settings_and_mlflow_run(workdir, tmp_path, scfm_bin):
    out = tmp_path / "pbmc.embedded.h5ad"
    proc = scfm_bin("embed", workdir / "pbmc.h5ad", "-o", out, "--checkpoint", workdir / "ckpt",
                    "--pool", "max", "--target-depth", "a1", "--precision", "fp32", "--quiet")
    assert proc.returncode == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (60, 630) and list(adata.var_names[:3]) == list(Vocabulary.load(workdir / "vocab.tsv").genes[:3])
    assert adata.obsm["X_scfm"].shape == (60, 64)
    settings = adata.uns["scfm"]["embed"]
    assert settings["pool"] == "max" and settings["target_depth"] == "a1" and settings["precision"] == "fp32"
    assert settings["precision_reason"] == "requested fp32"
    assert adata.uns["scfm"]["vocab_sha256"] == settings["vocab_sha256"]
    assert "bulk_labels" in adata.obs
    # same numbers as the library call on the aligned counts
    model = load_checkpoint(workdir / "ckpt").model
    expected = embed_cells(model, adata.X, pool="max", target_depth="a1", precision="fp32")
    np.testing.assert_allclose(adata.obsm["X_scfm"], expected, atol=1e-6, rtol=0)
    (finished,) = _mlflow_runs(tmp_path / "mlflow.db")
    assert finished.info.status == "FINISHED"
    assert finished.data.params["pool"] == "max" and finished.data.metrics["n_cells"] == 60
    assert finished.data.params["precision_reason"] == "requested fp32"

    # an already aligned file is embedded as it is (no second alignment), with the same result
    again = tmp_path / "again.h5ad"
    code, output = run("embed", out, "-o", again, "--checkpoint", workdir / "ckpt", "--pool", "max",
                       "--target-depth", "a1", "--precision", "fp32", "--quiet")
    assert code == 0, output
    second = ad.read_h5ad(again)
    assert bool(second.uns["scfm"]["embed"]["aligned_input"]) is True
    np.testing.assert_allclose(second.obsm["X_scfm"], adata.obsm["X_scfm"], atol=1e-6, rtol=0)


def test_decoder_outputs(workdir, tmp_path):
    expr = tmp_path / "expr.h5ad"
    code, output = run("embed", workdir / "pbmc.h5ad", "-o", expr, "--checkpoint", workdir / "ckpt",
                       "--output-type", "gene-expression", "--batch-size", "16", "--quiet")
    assert code == 0, output
    adata = ad.read_h5ad(expr)
    assert adata.layers["scfm_expr"].shape == (60, 630) and np.isfinite(adata.layers["scfm_expr"]).all()
    genes = tmp_path / "genes.npy"
    code, output = run("embed", expr, "-o", genes, "--checkpoint", workdir / "ckpt", "--output-type", "gene", "--quiet")
    assert code == 0, output
    assert np.load(genes, mmap_mode="r").shape == (60, 630, 32)


def test_convert_then_embed_equals_embedding_the_official_file(workdir, tmp_path):
    converted = tmp_path / "rde"
    code, output = run("convert", workdir / "models.ckpt", "-o", converted, "--version", "rde",
                       "--vocab", workdir / "vocab.tsv", "--quiet")
    assert code == 0, output
    assert sorted(p.name for p in converted.iterdir()) == ["config.json", "model.safetensors", "vocab.tsv"]
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    assert run("embed", workdir / "pbmc.h5ad", "-o", a, "--checkpoint", workdir / "models.ckpt", "--version", "rde",
               "--vocab", workdir / "vocab.tsv", "--quiet")[0] == 0
    assert run("embed", workdir / "pbmc.h5ad", "-o", b, "--checkpoint", converted, "--quiet")[0] == 0
    np.testing.assert_array_equal(np.load(a), np.load(b))
    ce = tmp_path / "ce.npy"
    assert run("embed", workdir / "pbmc.h5ad", "-o", ce, "--checkpoint", workdir / "models.ckpt",
               "--vocab", workdir / "vocab.tsv", "--quiet")[0] == 0
    assert np.abs(np.load(ce) - np.load(a)).max() > 1e-3  # ce and rde are different models


def _corrupt_checkpoint(workdir, tmp_path):
    data = torch.load(workdir / "models.ckpt", weights_only=True)
    data["cell"]["state_dict"]["model.encoder.adapter.weight"] = torch.zeros(3)
    path = tmp_path / "extra_keys.ckpt"
    torch.save(data, path)
    return path


def _normalised_without_totals(workdir, tmp_path):
    adata = ad.read_h5ad(workdir / "pbmc.h5ad")[:10].copy()
    vocab = Vocabulary.load(workdir / "vocab.tsv")
    from scfm.data.align import align_adata

    aligned, _ = align_adata(adata, vocab)
    path = tmp_path / "normalised.h5ad"
    aligned.write_h5ad(path)
    return path


@pytest.mark.parametrize("case, extra, exit_code, message", [
    ("missing checkpoint", lambda w, t: ["--checkpoint", t / "nope"], 1, "checkpoint not found"),
    ("unexpected keys", lambda w, t: ["--checkpoint", _corrupt_checkpoint(w, t), "--vocab", w / "vocab.tsv"], 1,
     "unexpected keys in the official checkpoint: encoder.adapter.weight"),
    ("official without vocab", lambda w, t: ["--checkpoint", w / "models.ckpt"], 1, "pass the gene list with --vocab"),
    ("vocab mismatch", lambda w, t: ["--checkpoint", w / "ckpt", "--vocab", _other_vocab(t)], 1, "vocabulary mismatch"),
    ("gene output to h5ad", lambda w, t: ["--checkpoint", w / "ckpt", "--output-type", "gene"], 2, "give an OUT ending in .npy"),
    ("bad target depth", lambda w, t: ["--checkpoint", w / "ckpt", "--target-depth", "x9"], 1, "invalid target depth"),
    ("A without totals", lambda w, t: ["--checkpoint", w / "ckpt", "--pre-normalized", "A",
                                       "--input", _normalised_without_totals(w, t)], 1, "obs\\['total_counts'\\]"),
    ("missing input", lambda w, t: ["--checkpoint", w / "ckpt", "--input", t / "absent.h5ad"], 1, "input not found"),
])
def test_errors_name_the_file_and_leave_no_output(workdir, tmp_path, case, extra, exit_code, message):
    import re

    args = extra(workdir, tmp_path)
    source = workdir / "pbmc.h5ad"
    if "--input" in args:
        source = args[args.index("--input") + 1]
        del args[args.index("--input") : args.index("--input") + 2]
    out = tmp_path / "out.h5ad"
    code, output = run("embed", source, "-o", out, *args, "--quiet")
    assert code == exit_code, output
    assert re.search(message, output), output
    assert re.search(r"^error: ", output, re.M), output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.h5ad") or p.name.startswith(".scfm-embed")]


def _other_vocab(tmp_path):
    path = tmp_path / "other.tsv"
    Vocabulary([f"OTHER{i}" for i in range(630)]).save(path)
    return path


def test_convert_errors_leave_no_output(workdir, tmp_path):
    out = tmp_path / "converted"
    code, output = run("convert", workdir / "models.ckpt", "-o", out, "--vocab", _other_vocab(tmp_path).with_name("missing.tsv"))
    assert code == 1 and "vocabulary file not found" in output and not out.exists()
    short = tmp_path / "short.tsv"
    Vocabulary(["A", "B"]).save(short)
    code, output = run("convert", workdir / "models.ckpt", "-o", out, "--vocab", short)
    assert code == 1 and "vocabulary mismatch" in output and not out.exists()


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_embedding_records_the_identity_of_the_loaded_weights(workdir, tmp_path):
    official = tmp_path / "official.h5ad"
    assert run("embed", workdir / "pbmc.h5ad", "-o", official, "--checkpoint", workdir / "models.ckpt",
               "--version", "rde", "--vocab", workdir / "vocab.tsv", "--quiet")[0] == 0
    settings = ad.read_h5ad(official).uns["scfm"]["embed"]
    assert settings["checkpoint_sha256"] == f"{_sha256(workdir / 'models.ckpt')}:rde"


def test_annotate_refuses_a_reference_from_another_checkpoint_of_the_same_shape(workdir, tmp_path):
    import shutil

    vocab = Vocabulary.load(workdir / "vocab.tsv")
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    other = save_checkpoint(tmp_path / "other_ckpt", XTrimoGene(config, seed=11), config, vocab)
    moved = shutil.copytree(workdir / "ckpt", tmp_path / "same_weights_elsewhere")
    reference, same, different = (tmp_path / f"{name}.h5ad" for name in ("reference", "same", "different"))
    for out, checkpoint in ((reference, workdir / "ckpt"), (same, moved), (different, other)):
        code, output = run("embed", workdir / "pbmc.h5ad", "-o", out, "--checkpoint", checkpoint, "--quiet")
        assert code == 0, output
    ref_settings = ad.read_h5ad(reference).uns["scfm"]["embed"]
    assert ref_settings["checkpoint_sha256"] == _sha256(workdir / "ckpt" / "model.safetensors")
    assert ad.read_h5ad(different).uns["scfm"]["embed"]["checkpoint_sha256"] != ref_settings["checkpoint_sha256"]

    refused = tmp_path / "refused.h5ad"
    code, output = run("annotate", different, "-o", refused, "--reference", reference, "--label-key", "bulk_labels")
    assert code == 1, output
    assert f"error: {reference}: reference was embedded with a different checkpoint" in output
    assert "checkpoint_sha256" in output
    assert not refused.exists() and not list(tmp_path.glob(".refused.h5ad*"))

    # the same weights under another path (as a pipeline stages them) are the same reference
    accepted = tmp_path / "accepted.h5ad"
    code, output = run("annotate", same, "-o", accepted, "--reference", reference, "--label-key", "bulk_labels")
    assert code == 0, output
    assert ad.read_h5ad(accepted).obs["scfm_cell_type"].notna().all()


def test_auto_precision_records_what_it_picked_and_why(workdir, tmp_path):
    from scfm.model.precision import cpu_native_bf16

    out = tmp_path / "auto.h5ad"
    code, output = run("embed", workdir / "pbmc.h5ad", "-o", out, "--checkpoint", workdir / "ckpt", "--quiet")
    assert code == 0, output
    settings = ad.read_h5ad(out).uns["scfm"]["embed"]
    assert settings["precision"] in ("fp32", "bf16") and settings["precision_reason"].startswith("auto on CPU")
    assert ("no native bf16" in settings["precision_reason"]) == (not cpu_native_bf16())
