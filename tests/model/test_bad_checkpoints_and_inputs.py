"""Checkpoints are validated where they are loaded, and embed/enhance check their input the same way on
every path: a broken file gives one ``error: <file>: <problem>`` line, a non-zero exit and no output."""

from __future__ import annotations

import json
import shutil

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from click.testing import CliRunner

from scfm.cli import cli
from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError
from scfm.model import ModelConfig, XTrimoGene
from scfm.model.checkpoint import load_checkpoint, save_checkpoint, write_official_style_checkpoint

STORE = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, pbmc_counts, shared_store_uri):
    """40 real PBMCs (raw and aligned), their vocabulary, a tiny checkpoint and an official-style file."""
    from scfm.data.align import align_adata

    root = tmp_path_factory.mktemp("bad_checkpoints")
    STORE["uri"] = shared_store_uri
    cells = pbmc_counts[:40].copy()
    cells.write_h5ad(root / "raw.h5ad")
    vocab = Vocabulary([str(g) for g in cells.var_names])
    vocab.save(root / "vocab.tsv")
    aligned, _ = align_adata(cells, vocab)
    aligned.write_h5ad(root / "aligned.h5ad")
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    save_checkpoint(root / "ckpt", XTrimoGene(config, seed=1), config, vocab)
    write_official_style_checkpoint(root / "models.ckpt", config, seed=2, versions=("cell",))
    return root


@pytest.fixture(scope="module")
def shared_store_uri(tmp_path_factory):
    from scfm import tracking

    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    tracking.ensure_store(uri)
    return uri


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args] + ["--mlflow-uri", STORE["uri"], "--quiet"],
                                catch_exceptions=False)
    return result.exit_code, result.output


def assert_refused(output_path, code, output, path, message):
    assert code == 1, output
    assert output.strip().splitlines() == [line for line in output.strip().splitlines() if line.startswith("error:")]
    (line,) = output.strip().splitlines()  # one line: no traceback, no advice
    assert line.startswith(f"error: {path}: ") and message in line, line
    assert not output_path.exists()
    assert not [p for p in output_path.parent.iterdir() if p.name.startswith(("." + output_path.name, ".scfm-embed"))]


# -- our checkpoint directory ----------------------------------------------------------------------------
def _copy(workdir, tmp_path):
    return shutil.copytree(workdir / "ckpt", tmp_path / "ckpt")


def test_non_finite_config_values_are_refused_naming_config_json(workdir, tmp_path):
    ckpt = _copy(workdir, tmp_path)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["bin_alpha"] = float("nan")
    (ckpt / "config.json").write_text(json.dumps(meta))  # json writes NaN, and reads it back
    out = tmp_path / "out.h5ad"
    code, output = run("embed", workdir / "aligned.h5ad", "-o", out, "--checkpoint", ckpt)
    assert_refused(out, code, output, ckpt / "config.json", "model config: bin_alpha must be a finite number")


def test_non_finite_weights_are_refused_naming_the_weights(workdir, tmp_path):
    from safetensors.torch import load_file, save_file

    ckpt = _copy(workdir, tmp_path)
    state = load_file(str(ckpt / "model.safetensors"))
    state["encoder.0.ff_in.weight"][3, 5] = float("nan")
    save_file(state, str(ckpt / "model.safetensors"))
    out = tmp_path / "out.h5ad"
    code, output = run("embed", workdir / "aligned.h5ad", "-o", out, "--checkpoint", ckpt)
    assert_refused(out, code, output, ckpt / "model.safetensors",
                   "weights hold NaN or infinite values (encoder.0.ff_in.weight)")


def test_a_vocabulary_changed_after_saving_is_refused(workdir, tmp_path):
    ckpt = _copy(workdir, tmp_path)
    genes = Vocabulary.load(ckpt / "vocab.tsv").genes
    genes[0], genes[1] = genes[1], genes[0]  # same genes, other order: every embedding would be wrong
    Vocabulary(genes).save(ckpt / "vocab.tsv")
    out = tmp_path / "out.h5ad"
    code, output = run("embed", workdir / "raw.h5ad", "-o", out, "--checkpoint", ckpt)
    assert_refused(out, code, output, ckpt / "vocab.tsv", "does not match config.json (vocab_sha256")


# -- the official file -------------------------------------------------------------------------------------
def _official(workdir, tmp_path, change):
    data = torch.load(workdir / "models.ckpt", weights_only=True)
    change(data["cell"])
    path = tmp_path / "changed.ckpt"
    torch.save(data, path)
    return path


def _set_depth_zero(entry):
    entry["config"]["model_config"]["mae_autobin"]["encoder"]["depth"] = 0


def _nan_bin_alpha(entry):
    entry["config"]["model_config"]["mae_autobin"]["bin_alpha"] = float("nan")


def _state_dict_list(entry):
    entry["state_dict"] = list(entry["state_dict"].values())


def _non_tensor_value(entry):
    entry["state_dict"]["model.pos_emb.weight"] = [[0.0] * 4]


def _nan_weight(entry):
    entry["state_dict"]["model.to_final.weight"][0, 0] = float("inf")


@pytest.mark.parametrize("change, message", [
    (_set_depth_zero, "[cell] model config: encoder_layers must be a positive integer"),
    (_nan_bin_alpha, "[cell] model config: bin_alpha must be a finite number"),
    (_state_dict_list, "[cell] 'state_dict' and 'config' must be mappings, got list and dict"),
    (_non_tensor_value, "[cell] state_dict holds a list for model.pos_emb.weight, not a tensor"),
    (_nan_weight, "weights hold NaN or infinite values (head.weight)"),
], ids=["bad-model-config", "nan-config", "state-dict-list", "non-tensor", "inf-weight"])
def test_a_broken_official_file_is_one_line_naming_it(workdir, tmp_path, change, message):
    ckpt = _official(workdir, tmp_path, change)
    out = tmp_path / "out.h5ad"
    code, output = run("embed", workdir / "raw.h5ad", "-o", out, "--checkpoint", ckpt, "--vocab",
                       workdir / "vocab.tsv")
    assert_refused(out, code, output, ckpt, message)


def test_a_text_file_as_checkpoint_is_one_line(workdir, tmp_path):
    ckpt = tmp_path / "notes.ckpt"
    ckpt.write_text("these are my notes, not a model\n")
    out = tmp_path / "out.h5ad"
    code, output = run("convert", ckpt, "-o", out, "--vocab", workdir / "vocab.tsv")
    assert_refused(out, code, output, ckpt, "not a scfm checkpoint directory nor a readable official checkpoint")


class _PlantMarker:
    """Unpickling this object creates a file: proof that pickled code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_malicious_official_file_is_refused_in_one_line_without_advice_to_load_it(workdir, tmp_path):
    marker = tmp_path / "code-ran"
    data = torch.load(workdir / "models.ckpt", weights_only=True)
    data["cell"]["extra"] = _PlantMarker(marker)
    ckpt = tmp_path / "planted.ckpt"
    torch.save(data, ckpt)
    for command in ("embed", "enhance", "finetune", "convert"):
        out = tmp_path / ("out" if command in ("finetune", "convert") else "out.h5ad")
        argv = {"embed": ["embed", workdir / "raw.h5ad", "-o", out, "--checkpoint", ckpt, "--vocab",
                          workdir / "vocab.tsv"],
                "enhance": ["enhance", workdir / "raw.h5ad", "-o", out, "--checkpoint", ckpt, "--version", "ce",
                            "--vocab", workdir / "vocab.tsv"],
                "finetune": ["finetune", workdir / "aligned.h5ad", "-o", out, "--checkpoint", ckpt, "--vocab",
                             workdir / "vocab.tsv", "--label-key", "bulk_labels"],
                "convert": ["convert", ckpt, "-o", out, "--vocab", workdir / "vocab.tsv"]}[command]
        code, output = run(*argv)
        assert_refused(out, code, output, ckpt, "refused: holds pickled Python objects (builtins.getattr, pathlib")
        assert "weights_only" not in output and "trust" not in output
    assert not marker.exists()
    torch.load(ckpt, weights_only=False)  # the planted object is live: loading it the unsafe way runs it
    assert marker.exists()


# -- embed and enhance on inputs that skip alignment ---------------------------------------------------------
def _aligned_with(workdir, tmp_path, change, name="bad.aligned.h5ad"):
    adata = ad.read_h5ad(workdir / "aligned.h5ad")
    adata.X = change(sp.csr_matrix(adata.X, dtype=np.float32))
    path = tmp_path / name
    adata.write_h5ad(path)
    return path


def _set_first(value):
    def change(x):
        x.data[0] = value
        return x
    return change


def _log_normalised(x):
    x = x.copy()
    x.data = np.log1p(x.data / np.repeat(np.asarray(x.sum(axis=1)).ravel(), np.diff(x.indptr)) * 1e4)
    return x


BAD_VALUES = [
    (_set_first(-3.0), "X has negative values"),
    (_set_first(np.inf), "X has infinite values"),
    (_set_first(np.nan), "X has NaN values"),
    (_log_normalised, "X has non-integer values where raw counts are required"),
    (lambda x: x * 0.5, "X has non-integer values where raw counts are required"),
]


@pytest.mark.parametrize("change, message", BAD_VALUES, ids=["negative", "inf", "nan", "log-normalised", "fractional"])
def test_embed_checks_an_aligned_input_like_an_unaligned_one(workdir, tmp_path, change, message):
    aligned = _aligned_with(workdir, tmp_path, change)
    raw = ad.read_h5ad(aligned)
    raw = raw[:, ::-1].copy()  # the same cells in another gene order: embed aligns them first
    unaligned = tmp_path / "bad.raw.h5ad"
    raw.write_h5ad(unaligned)
    for source in (aligned, unaligned):
        out = tmp_path / "out.h5ad"
        code, output = run("embed", source, "-o", out, "--checkpoint", workdir / "ckpt")
        assert_refused(out, code, output, source, message)


def test_every_block_of_an_aligned_input_is_checked_as_it_is_read(workdir, tmp_path):
    import h5py

    from scfm.tasks.embed import H5adRows

    path = _aligned_with(workdir, tmp_path, lambda x: x)
    with h5py.File(path, "r+") as handle:
        handle["X"]["data"][-1] = 2.5  # in the last cell, past what a first look samples on a large file
    with h5py.File(path, "r") as handle:
        rows = H5adRows(handle["X"], path, check="counts")
        rows[0:10]
        with pytest.raises(ScfmError, match="X has non-integer values"):
            rows[30:40]
        assert H5adRows(handle["X"], path, check="values")[30:40].shape == (10, rows.shape[1])


@pytest.mark.parametrize("command", ["embed", "enhance"])
def test_an_aligned_input_without_cells_is_refused(workdir, tmp_path, command):
    empty = tmp_path / "empty.aligned.h5ad"
    ad.read_h5ad(workdir / "aligned.h5ad")[:0].copy().write_h5ad(empty)
    out = tmp_path / "out.h5ad"
    code, output = run(command, empty, "-o", out, "--checkpoint", workdir / "ckpt")
    assert_refused(out, code, output, empty, "input has zero cells")


def test_enhance_refuses_non_finite_counts(workdir, tmp_path):
    bad = _aligned_with(workdir, tmp_path, _set_first(np.inf))
    out = tmp_path / "out.h5ad"
    code, output = run("enhance", bad, "-o", out, "--checkpoint", workdir / "ckpt")
    assert_refused(out, code, output, bad, "X has infinite values")


def test_a_model_that_outputs_nan_is_never_written_quietly(workdir):
    from scfm.tasks.embed import embed_cells, predict_expression

    model = load_checkpoint(workdir / "ckpt").model
    with torch.no_grad():
        model.encoder_norm.weight[0] = float("nan")  # as if the weights were damaged in memory
    counts = sp.csr_matrix(ad.read_h5ad(workdir / "aligned.h5ad").X[:6])
    with pytest.raises(ScfmError, match=r"the model gave NaN or infinite outputs for 6 cell\(s\) \(first: row 0\)"):
        embed_cells(model, counts, device="cpu")
    with pytest.raises(ScfmError, match="NaN or infinite outputs"):
        predict_expression(model, counts, device="cpu")


@pytest.mark.parametrize("command", ["embed", "finetune"])
def test_a_failing_step_leaves_no_new_folder_with_only_an_mlflow_store(workdir, tmp_path, command, monkeypatch):
    """The default store (no --mlflow-uri) lives next to the output; it is created once there is something to log."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    bad = _aligned_with(workdir, tmp_path, _set_first(-1.0))
    new = tmp_path / "new" / "deeper"
    argv = {"embed": ["embed", bad, "-o", new / "out.h5ad", "--checkpoint", workdir / "ckpt"],
            "finetune": ["finetune", bad, "-o", new / "classifier", "--checkpoint", workdir / "ckpt",
                         "--label-key", "bulk_labels"]}[command]
    result = CliRunner().invoke(cli, [str(a) for a in argv] + ["--quiet"], catch_exceptions=False)
    assert result.exit_code == 1 and "negative values" in result.output, result.output
    assert not (tmp_path / "new").exists()
