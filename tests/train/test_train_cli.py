"""Every error path of `scfm pretrain` and `scfm finetune`: one-line message naming the file, no output left."""

from __future__ import annotations

import pytest
from train_helpers import error_line, run_cli

LABEL_KEY = "bulk_labels"


# ------------------------------------------------------------------------------------------ pretrain


def test_pretrain_without_manifest(train_data, tmp_path):
    empty = tmp_path / "not_shards"
    empty.mkdir()
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", empty, "--vocab", train_data["vocab"], "-o", out, "--quiet")
    assert result.exit_code == 1
    assert "manifest.json" in error_line(result) and "no shard manifest" in result.output
    assert not out.exists()


def test_pretrain_with_another_vocabulary(train_data, tmp_path):
    other = tmp_path / "other_vocab.tsv"
    other.write_text("gene_name\n" + "\n".join(f"G{i}" for i in range(10)) + "\n")
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", train_data["shards"], "--vocab", other, "-o", out, "--quiet")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(train_data["shards"]) in line and "another vocabulary" in line
    assert not out.exists()


def test_pretrain_resume_without_checkpoint(train_data, tmp_path):
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "-o", out,
                     "--resume", "--quiet")
    assert result.exit_code == 1
    line = error_line(result)
    assert "no checkpoint to resume from" in line and str(out / "checkpoints") in line
    assert not out.exists()


def test_pretrain_with_a_broken_deepspeed_config(train_data, tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text("{\"zero_optimization\": ")
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "-o", out,
                     "--deepspeed-config", bad, "--quiet")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(bad) in line and "not a JSON DeepSpeed config" in line
    assert not out.exists()


def test_pretrain_needs_a_vocabulary_or_a_checkpoint(train_data, tmp_path):
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", train_data["shards"], "-o", out, "--quiet")
    assert result.exit_code == 2
    assert "--vocab" in error_line(result)
    assert not out.exists()


@pytest.mark.parametrize("flag, value", [("--mask-ratio", "1.5"), ("--downsample-prob", "-0.1")])
def test_pretrain_bad_ratios(train_data, tmp_path, flag, value):
    out = tmp_path / "out"
    result = run_cli("pretrain", "--shards", train_data["shards"], "--vocab", train_data["vocab"], "-o", out,
                     flag, value, "--quiet")
    assert result.exit_code == 2  # refused while parsing the flags, before any work
    assert f"Invalid value for '{flag}'" in result.output and "is not in the range 0" in result.output
    assert not out.exists()


# ------------------------------------------------------------------------------------------ finetune


def _finetune(train_data, tmp_path, *extra, input_path=None, checkpoint=None, label_key=LABEL_KEY):
    out = tmp_path / "classifier"
    result = run_cli("finetune", input_path or train_data["aligned"], "-o", out,
                     "--checkpoint", checkpoint or train_data["checkpoint"], "--label-key", label_key, "--quiet",
                     *extra)
    return result, out


def test_finetune_on_data_aligned_to_another_vocabulary(train_data, tmp_path, pbmc_counts):
    adata = pbmc_counts.copy()
    adata.uns["scfm"] = {"vocab_sha256": "0" * 64}
    path = tmp_path / "other.aligned.h5ad"
    adata.write_h5ad(path)
    result, out = _finetune(train_data, tmp_path, input_path=path)
    assert result.exit_code == 1
    line = error_line(result)
    assert str(path) in line and "another vocabulary" in line
    assert not out.exists() and not (tmp_path / "mlflow.db").exists()


def test_finetune_on_an_unaligned_file(train_data, tmp_path, pbmc_counts):
    path = tmp_path / "raw.h5ad"
    pbmc_counts.write_h5ad(path)
    result, out = _finetune(train_data, tmp_path, input_path=path)
    assert result.exit_code == 1
    assert str(path) in error_line(result) and "scfm align" in result.output
    assert not out.exists()


def test_finetune_without_the_label_column(train_data, tmp_path):
    result, out = _finetune(train_data, tmp_path, label_key="cell_type")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(train_data["aligned"]) in line and "'cell_type'" in line
    assert not out.exists()


def test_finetune_with_a_missing_checkpoint(train_data, tmp_path):
    missing = tmp_path / "nope"
    result, out = _finetune(train_data, tmp_path, checkpoint=missing)
    assert result.exit_code == 1
    assert str(missing) in error_line(result) and "checkpoint not found" in result.output
    assert not out.exists()


def test_finetune_unfreezing_more_layers_than_exist(train_data, tmp_path):
    result, out = _finetune(train_data, tmp_path, "--unfreeze-layers", "9")
    assert result.exit_code == 2
    assert "only 2 layers" in error_line(result)
    assert not out.exists()


def test_finetune_with_a_broken_input_file(train_data, tmp_path):
    path = tmp_path / "broken.h5ad"
    path.write_text("not hdf5")
    result, out = _finetune(train_data, tmp_path, input_path=path)
    assert result.exit_code == 1
    assert str(path) in error_line(result) and "not a readable h5ad" in result.output
    assert not out.exists()


def test_finetune_with_one_usable_class(train_data, tmp_path, pbmc_counts):
    adata = pbmc_counts.copy()
    adata.uns["scfm"] = {"vocab_sha256": train_data["vocab_obj"].sha256}
    adata.obs["one"] = "T cell"
    path = tmp_path / "one.aligned.h5ad"
    adata.write_h5ad(path)
    result, out = _finetune(train_data, tmp_path, input_path=path, label_key="one")
    assert result.exit_code == 1
    assert "at least two classes" in error_line(result)
    assert not out.exists()


def _aligned_copy(train_data, path, *, vocab_sha256=None, drop_labels=False):
    import anndata as ad

    adata = ad.read_h5ad(train_data["aligned"])[:100].copy()
    if vocab_sha256 is not None:
        adata.uns["scfm"] = {"vocab_sha256": vocab_sha256}
    if drop_labels:
        del adata.obs[LABEL_KEY]
    adata.write_h5ad(path)
    return path


def test_finetune_on_several_inputs_with_another_vocabulary(train_data, tmp_path):
    other = _aligned_copy(train_data, tmp_path / "other.aligned.h5ad", vocab_sha256="0" * 64)
    out = tmp_path / "classifier"
    result = run_cli("finetune", train_data["aligned"], other, "-o", out, "--checkpoint", train_data["checkpoint"],
                     "--label-key", LABEL_KEY, "--quiet")
    assert result.exit_code == 1
    line = error_line(result)
    assert str(other) in line and "another vocabulary" in line
    assert not out.exists()


def test_finetune_when_no_input_has_the_label_column(train_data, tmp_path):
    a = _aligned_copy(train_data, tmp_path / "a.aligned.h5ad", drop_labels=True)
    b = _aligned_copy(train_data, tmp_path / "b.aligned.h5ad", drop_labels=True)
    out = tmp_path / "classifier"
    result = run_cli("finetune", a, b, "-o", out, "--checkpoint", train_data["checkpoint"], "--label-key", LABEL_KEY,
                     "--quiet")
    assert result.exit_code == 1
    line = error_line(result)
    assert line == f"error: {a}: no obs column '{LABEL_KEY}' in any input (a.aligned.h5ad, b.aligned.h5ad)"
    assert not out.exists()


def test_finetune_inputs_with_the_same_file_name(train_data, tmp_path):
    (tmp_path / "x").mkdir()
    twin = _aligned_copy(train_data, tmp_path / "x" / train_data["aligned"].name)
    out = tmp_path / "classifier"
    result = run_cli("finetune", train_data["aligned"], twin, "-o", out, "--checkpoint", train_data["checkpoint"],
                     "--label-key", LABEL_KEY, "--quiet")
    assert result.exit_code == 2
    assert "distinct file names" in error_line(result)
    assert not out.exists()
