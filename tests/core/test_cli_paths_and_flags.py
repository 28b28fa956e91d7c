"""Every command checks its output paths and numeric flags before any work: one line, non-zero exit,
nothing created (not even the MLflow store)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from scfm.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error: ")]


@pytest.fixture
def paths(train_data, tmp_path):
    """The shared PBMC inputs, a regular file to put outputs "under", and a store URI that must stay unused."""
    (tmp_path / "notes.txt").write_text("not a folder\n")
    reference = train_data["root"] / "reference.h5ad"
    return {**train_data, "notes": tmp_path / "notes.txt", "store": tmp_path / "never" / "mlflow.db",
            "reference": reference, "tmp": tmp_path}


def _commands(p):
    """(name, argv with OUT standing for the output path) for every command that writes."""
    aligned, ckpt, vocab, shards = p["aligned"], p["checkpoint"], p["vocab"], p["shards"]
    return {
        "qc": ["qc", aligned, "-o", "OUT", "--min-genes", 5],
        "qc --plots-dir": ["qc", aligned, "-o", p["tmp"] / "ok.h5ad", "--plots-dir", "OUT"],
        "align": ["align", aligned, "-o", "OUT", "--vocab", vocab],
        "align --shards-dir": ["align", aligned, "--shards-dir", "OUT", "--vocab", vocab],
        "vocab build": ["vocab", "build", aligned, "-o", "OUT"],
        "embed": ["embed", aligned, "-o", "OUT", "--checkpoint", ckpt],
        "convert": ["convert", ckpt, "-o", "OUT", "--vocab", vocab],
        "pretrain": ["pretrain", "--shards", shards, "--vocab", vocab, "-o", "OUT"],
        "finetune": ["finetune", aligned, "-o", "OUT", "--checkpoint", ckpt, "--label-key", "bulk_labels"],
        "annotate": ["annotate", aligned, "-o", "OUT", "--reference", aligned, "--label-key", "bulk_labels"],
        "enhance": ["enhance", aligned, "-o", "OUT", "--checkpoint", ckpt],
        "report": ["report", aligned, "-o", "OUT"],
        "demo": ["demo", "-o", "OUT"],
        "drug train": ["drug", "train", aligned, "--response", aligned, "--smiles", aligned, "-o", "OUT"],
        "drug predict": ["drug", "predict", aligned, "--model", p["tmp"], "-o", "OUT"],
        "drug adapt": ["drug", "adapt", aligned, "--response", aligned, "--target", aligned, "--drugs", "x",
                       "-o", "OUT"],
        "drug score": ["drug", "score", aligned, "--model", p["tmp"], "-o", "OUT"],
        "perturb assign": ["perturb", "assign", aligned, "--guide-counts", aligned, "--guide-targets", aligned,
                           "-o", "OUT"],
        "perturb train": ["perturb", "train", aligned, "--perturbation-key", "x", "--control", "c", "-o", "OUT"],
        "perturb predict": ["perturb", "predict", p["tmp"], "--perturbation", "A", "-o", "OUT"],
        "genes modules": ["genes", "modules", aligned, "-o", "OUT", "--checkpoint", ckpt],
        "genes network": ["genes", "network", aligned, "--tf-list", vocab, "-o", "OUT", "--checkpoint", ckpt],
    }


COMMANDS = ["qc", "qc --plots-dir", "align", "align --shards-dir", "vocab build", "embed", "convert", "pretrain",
            "finetune", "annotate", "enhance", "report", "demo", "drug train", "drug predict", "drug adapt",
            "drug score", "perturb assign", "perturb train", "perturb predict", "genes modules", "genes network"]


@pytest.mark.parametrize("command", COMMANDS)
def test_an_output_under_a_regular_file_is_refused_before_any_work(paths, command):
    out = paths["notes"] / "sub" / "out.h5ad"
    argv = [out if a == "OUT" else a for a in _commands(paths)[command]]
    result = run(*argv, "--mlflow-uri", f"sqlite:///{paths['store']}", "--quiet")
    assert result.exit_code == 1, result.output
    assert error_lines(result) == [f"error: {out}: cannot write here: {paths['notes']} is a file, not a folder"]
    assert not paths["store"].parent.exists()  # checked before the MLflow run was opened


SAME_AS_INPUT = {
    # command: (argv with IN for the input and OUT for the output, how OUT is spelt from IN)
    "qc": (["qc", "IN", "-o", "OUT", "--min-genes", 5], "dotted"),
    "qc (symlink)": (["qc", "IN", "-o", "OUT", "--min-genes", 5], "symlink"),
    "align": (["align", "IN", "-o", "OUT", "--vocab", "VOCAB"], "dotted"),
    "align (symlink)": (["align", "IN", "-o", "OUT", "--vocab", "VOCAB"], "symlink"),
    "align --coverage-json": (["align", "IN", "-o", "ELSEWHERE", "--vocab", "VOCAB", "--coverage-json", "OUT"],
                              "same"),
    "vocab build": (["vocab", "build", "IN", "-o", "OUT"], "same"),
    "embed": (["embed", "IN", "-o", "OUT", "--checkpoint", "CKPT"], "dotted"),
    "annotate": (["annotate", "IN", "-o", "OUT", "--reference", "IN", "--label-key", "bulk_labels"], "symlink"),
    "enhance": (["enhance", "IN", "-o", "OUT", "--checkpoint", "CKPT"], "same"),
    "report": (["report", "IN", "-o", "OUT"], "same"),
    "finetune (folder holding the input)": (["finetune", "IN", "-o", "PARENT", "--checkpoint", "CKPT",
                                             "--label-key", "bulk_labels"], "parent"),
    "convert (folder holding the input)": (["convert", "CKPTFILE", "-o", "PARENT", "--vocab", "VOCAB"], "parent"),
    "genes modules (folder holding the input)": (["genes", "modules", "IN", "-o", "PARENT", "--checkpoint", "CKPT"],
                                                 "parent"),
    "genes network": (["genes", "network", "IN", "--tf-list", "VOCAB", "-o", "OUT", "--checkpoint", "CKPT"], "dotted"),
}


@pytest.mark.parametrize("case", list(SAME_AS_INPUT))
def test_an_output_that_is_an_input_is_refused(paths, case, monkeypatch):
    import shutil

    argv, spelling = SAME_AS_INPUT[case]
    folder = paths["tmp"] / "data"
    folder.mkdir()
    source = shutil.copy(paths["aligned"], folder / "cells.h5ad")
    ckpt_file = folder / "models.ckpt"
    ckpt_file.write_bytes(b"never read")
    original = source.read_bytes()
    monkeypatch.chdir(paths["tmp"])
    if spelling == "dotted":
        out = "data/../data/cells.h5ad"
    elif spelling == "symlink":
        out = paths["tmp"] / "link.h5ad"
        out.symlink_to(source)
    elif spelling == "parent":
        out = folder
    else:
        out = source
    values = {"IN": ckpt_file if "CKPTFILE" in argv else source, "OUT": out, "VOCAB": paths["vocab"],
              "CKPT": paths["checkpoint"], "ELSEWHERE": paths["tmp"] / "elsewhere.h5ad", "PARENT": out,
              "CKPTFILE": ckpt_file}
    result = run(*[values.get(a, a) if isinstance(a, str) else a for a in argv],
                 "--mlflow-uri", f"sqlite:///{paths['store']}", "--quiet")
    assert result.exit_code == 1, result.output
    (line,) = error_lines(result)
    assert line.startswith(f"error: {out}: ") and "writing the output would destroy it" in line
    assert source.read_bytes() == original and not paths["store"].parent.exists()


def test_two_outputs_on_one_path_are_refused(paths):
    out = paths["tmp"] / "r.html"
    result = run("report", paths["aligned"], "-o", out, "--metrics-json", out, "--mlflow-uri",
                 f"sqlite:///{paths['store']}")
    assert result.exit_code == 2 and error_lines(result) == [
        f"error: {out}: two outputs of this step are the same file ({out} and {out})"]


# -- numeric flags: finite and in range ----------------------------------------------------------------
def _flag_commands(p):
    aligned, ckpt, vocab = p["aligned"], p["checkpoint"], p["vocab"]
    out = p["tmp"] / "out"
    return {
        "pretrain": ["pretrain", "--shards", p["shards"], "--vocab", vocab, "-o", out],
        "finetune": ["finetune", aligned, "-o", out, "--checkpoint", ckpt, "--label-key", "bulk_labels"],
        "annotate": ["annotate", aligned, "-o", out, "--reference", aligned, "--label-key", "bulk_labels"],
        "enhance": ["enhance", aligned, "-o", out, "--checkpoint", ckpt],
        "embed": ["embed", aligned, "-o", out, "--checkpoint", ckpt],
        "align": ["align", aligned, "-o", out, "--vocab", vocab],
        "qc": ["qc", aligned, "-o", out],
        "drug train": ["drug", "train", aligned, "--response", aligned, "--smiles", aligned, "-o", out],
        "drug adapt": ["drug", "adapt", aligned, "--response", aligned, "--target", aligned, "--drugs", "x",
                       "-o", out],
        "perturb train": ["perturb", "train", aligned, "--perturbation-key", "x", "--control", "c", "-o", out],
        "perturb assign": ["perturb", "assign", aligned, "--guide-counts", aligned, "--guide-targets", aligned,
                           "-o", out],
        "genes modules": ["genes", "modules", aligned, "-o", out, "--checkpoint", ckpt],
    }


FLAGS = [
    ("pretrain", "--lr", "nan", "is not a finite number"),
    ("pretrain", "--lr", "inf", "is not a finite number"),
    ("pretrain", "--lr", "0", "not in the range x>0"),
    ("pretrain", "--min-lr-ratio", "2", "not in the range 0<=x<=1"),
    ("pretrain", "--weight-decay", "-1", "not in the range x>=0"),
    ("pretrain", "--gradient-clipping", "nan", "is not a finite number"),
    ("pretrain", "--mask-ratio", "0", "not in the range 0<x<=1"),
    ("pretrain", "--random-token-prob", "-inf", "is not a finite number"),
    ("pretrain", "--downsample-beta", "nan 2", "is not a finite number"),
    ("pretrain", "--encoder-dropout", "1", "not in the range 0<=x<1"),
    ("pretrain", "--mix-row-groups", "0", "not in the range x>=1"),
    ("pretrain", "--micro-batch-size", "0", "not in the range x>=1"),
    ("pretrain", "--max-steps", "-5", "not in the range x>=1"),
    ("pretrain", "--warmup-steps", "-1", "not in the range x>=0"),
    ("pretrain", "--seed", "-1", "not in the range x>=0"),
    ("finetune", "--lr", "nan", "is not a finite number"),
    ("finetune", "--lr", "-0.1", "not in the range x>0"),
    ("finetune", "--encoder-lr-ratio", "inf", "is not a finite number"),
    ("finetune", "--test-size", "1", "not in the range 0<x<1"),
    ("finetune", "--val-size", "nan", "is not a finite number"),
    ("finetune", "--epochs", "0", "not in the range x>=1"),
    ("finetune", "--batch-size", "0", "not in the range x>=1"),
    ("finetune", "--unfreeze-layers", "-1", "not in the range x>=0"),
    ("annotate", "--k", "0", "not in the range x>=1"),
    ("annotate", "--min-confidence", "nan", "is not a finite number"),
    ("annotate", "--min-confidence", "1.5", "not in the range 0<=x<=1"),
    ("enhance", "--thin-fraction", "1", "not in the range 0<x<1"),
    ("enhance", "--thin-fraction", "nan", "is not a finite number"),
    ("embed", "--min-coverage", "nan", "is not a finite number"),
    ("align", "--min-coverage", "inf", "is not a finite number"),
    ("qc", "--max-pct-mito", "nan", "is not a finite number"),
    ("qc", "--max-counts", "inf", "is not a finite number"),
    ("drug train", "--learning-rate", "nan", "is not a finite number"),
    ("drug train", "--test-fraction", "1", "not in the range 0<=x<1"),
    ("drug adapt", "--sensitive-quantile", "nan", "is not a finite number"),
    ("drug adapt", "--domain-weight", "inf", "is not a finite number"),
    ("perturb train", "--lr", "nan", "is not a finite number"),
    ("perturb train", "--coexpression-threshold", "1.5", "not in the range 0<=x<=1"),
    ("perturb assign", "--min-ratio", "nan", "is not a finite number"),
    ("genes modules", "--resolution", "nan", "is not a finite number"),
    ("genes modules", "--resolution", "0", "not in the range x>0"),
    ("genes modules", "--alpha", "inf", "is not a finite number"),
    ("genes modules", "--alpha", "0", "not in the range 0<x<=1"),
]


@pytest.mark.parametrize("command, flag, value, message", FLAGS, ids=[f"{c} {f} {v}" for c, f, v, _ in FLAGS])
def test_numeric_flags_must_be_finite_and_in_range(paths, command, flag, value, message):
    argv = _flag_commands(paths)[command]
    result = run(*argv, flag, *value.split(), "--mlflow-uri", f"sqlite:///{paths['store']}")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.output and message in result.output, result.output
    assert "Traceback" not in result.output
    assert not (paths["tmp"] / "out").exists() and not paths["store"].parent.exists()
