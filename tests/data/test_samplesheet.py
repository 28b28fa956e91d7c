"""Samplesheet parsing and validation against the packaged JSON schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from scfm.data import io
from scfm.errors import ScfmError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.h5ad").write_bytes(b"x")
    (tmp_path / "data" / "b_mtx").mkdir()
    return tmp_path


def _sheet(directory: Path, text: str) -> Path:
    path = directory / "samplesheet.csv"
    path.write_text(text)
    return path


def test_relative_paths_resolve_against_the_sheet_and_batch_defaults_to_sample(inputs, monkeypatch):
    monkeypatch.chdir("/")  # the working directory must not matter
    sheet = io.read_samplesheet(_sheet(inputs, "sample,path,batch\nA,data/a.h5ad,run1\nB,data/b_mtx,\n"))
    assert list(sheet.columns) == ["sample", "path", "batch"]
    assert list(sheet["sample"]) == ["A", "B"]
    assert sheet["path"].tolist() == [str(inputs / "data" / "a.h5ad"), str(inputs / "data" / "b_mtx")]
    assert list(sheet["batch"]) == ["run1", "B"]


def test_condition_column_is_kept_and_absolute_paths_pass(inputs):
    target = inputs / "data" / "a.h5ad"
    sheet = io.read_samplesheet(_sheet(inputs, f"sample,path,condition\nA,{target},treated\n"))
    assert sheet.loc[0, "condition"] == "treated"
    assert sheet.loc[0, "path"] == str(target)


@pytest.mark.parametrize(
    "text, message",
    [
        ("sample,file\nA,data/a.h5ad\n", "missing column(s) path"),
        ("path\ndata/a.h5ad\n", "missing column(s) sample"),
        ("sample,path\nA,data/a.h5ad\nA,data/b_mtx\n", "duplicate sample id 'A'"),
        ("sample,path\nA,data/a.h5ad\nB,data/nothere.h5ad\n", "row 2 (sample 'B'): path does not exist"),
        ("sample,path\nmy sample,data/a.h5ad\n", "column 'sample': sample id must be given"),
        ("sample,path\n,data/a.h5ad\n", "column 'sample'"),
        ("sample,path\n", "no rows"),
    ],
    ids=["no-path", "no-sample", "duplicate", "path-missing", "space-in-id", "blank-id", "no-rows"],
)
def test_invalid_samplesheets_raise_naming_the_sheet(inputs, text, message):
    path = _sheet(inputs, text)
    with pytest.raises(ScfmError) as info:
        io.read_samplesheet(path)
    assert message in info.value.message
    assert info.value.path == str(path)


def test_missing_and_empty_samplesheet(tmp_path):
    with pytest.raises(ScfmError, match="samplesheet not found"):
        io.read_samplesheet(tmp_path / "none.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ScfmError, match="empty.csv: samplesheet is empty"):
        io.read_samplesheet(tmp_path / "empty.csv")


def test_nextflow_schema_link_resolves_to_the_packaged_schema():
    link = REPO / "assets" / "schema_input.json"
    assert link.is_symlink() and not Path(link.readlink()).is_absolute()  # travels with clones
    assert link.resolve() == io.schema_path().resolve()
    schema = json.loads(link.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    sample = schema["items"]["properties"]["sample"]
    assert schema["type"] == "array" and sample["meta"] == ["id"]
    assert schema["items"]["properties"]["path"]["exists"] is True
    assert all("errorMessage" in prop for prop in schema["items"]["properties"].values())


def test_bundled_demo_samplesheet_reads_back_to_the_pbmc_counts(pbmc_counts):
    sheet = io.read_samplesheet(REPO / "assets" / "demo" / "samplesheet.csv")
    assert list(sheet["sample"]) == ["pbmc_a", "pbmc_b"] and list(sheet["batch"]) == ["batch1", "batch2"]
    reads = {row.sample: io.read_input(row.path, sample=row.sample, require_counts=True) for row in sheet.itertuples()}
    assert reads["pbmc_a"].counts_source == reads["pbmc_b"].counts_source == "X"
    assert "ensembl_id" not in reads["pbmc_a"].adata.var  # symbols only, documented in assets/demo/README.md
    for name, rows in (("pbmc_a", slice(0, None, 2)), ("pbmc_b", slice(1, None, 2))):
        adata = reads[name].adata
        expected = pbmc_counts[rows]
        assert list(adata.var_names) == list(pbmc_counts.var_names)
        assert list(adata.obs_names) == [f"{name}_{b}" for b in expected.obs_names]
        assert (adata.X != expected.X).nnz == 0
    assert list(reads["pbmc_b"].adata.obs["bulk_labels"]) == list(pbmc_counts[1::2].obs["bulk_labels"])
    total = sum(p.stat().st_size for p in (REPO / "assets" / "demo").rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


def test_demo_assets_script_is_deterministic(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_demo_assets", REPO / "scripts" / "make_demo_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_demo_assets(tmp_path / "demo")
    for name in ("pbmc_a/matrix.mtx.gz", "pbmc_a/features.tsv.gz", "pbmc_a/barcodes.tsv.gz", "samplesheet.csv",
                 "labels.csv", "README.md"):
        assert (tmp_path / "demo" / name).read_bytes() == (REPO / "assets" / "demo" / name).read_bytes(), name


@pytest.mark.parametrize(
    "text, message",
    [
        ("sample,path,bacth\nA,data/a.h5ad,run1\n",
         "unknown column(s) 'bacth' (allowed: sample, path, batch, condition)"),
        ("sample,path,batch\nA,data/a.h5ad,run/1\n", "row 1 (sample 'A'), column 'batch': batch must use only letters"),
        ("sample,path,batch\nA,data/a.h5ad,.hidden\n", "column 'batch'"),
        ("sample,path\n../A,data/a.h5ad\n", "column 'sample': sample id must be given"),
    ],
    ids=["misspelt-column", "slash-in-batch", "dot-first-batch", "path-in-sample-id"],
)
def test_names_that_become_file_names_and_unknown_columns_are_refused(inputs, text, message):
    path = _sheet(inputs, text)
    with pytest.raises(ScfmError) as info:
        io.read_samplesheet(path)
    assert message in info.value.message and info.value.path == str(path)


def test_the_schema_refuses_what_the_reader_refuses():
    """nf-schema validates the pipeline's samplesheet with the same schema file."""
    schema = json.loads(io.schema_path().read_text())
    validator = jsonschema.Draft202012Validator(schema)
    assert not list(validator.iter_errors([{"sample": "A", "path": "a.h5ad", "batch": "b1"}]))
    assert list(validator.iter_errors([{"sample": "A", "path": "a.h5ad", "bacth": "b1"}]))
    assert list(validator.iter_errors([{"sample": "A", "path": "a.h5ad", "batch": "b/1"}]))


# -- scfm samplesheet check ----------------------------------------------------------------------------
def _check(*args):
    from click.testing import CliRunner

    from scfm.cli import cli

    return CliRunner().invoke(cli, ["samplesheet", "check", *map(str, args)], catch_exceptions=False)


def test_check_prints_one_summary_line_for_a_valid_sheet(pbmc_counts):
    sheet = REPO / "assets" / "demo" / "samplesheet.csv"
    result = _check(sheet)
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [f"{sheet}: valid, 2 sample(s) in 2 batch(es), every input found"]
    assert _check(sheet, "--quiet").output == ""


@pytest.mark.parametrize(
    "text, message",
    [
        ("sample,file\nA,data/a.h5ad\n", "samplesheet is missing column(s) path"),
        ("sample,path,extra\nA,data/a.h5ad,x\n", "unknown column(s) 'extra'"),
        ("sample,path\nA,data/a.h5ad\nA,data/a.h5ad\n", "duplicate sample id 'A'"),
        ("sample,path\nA,data/missing.h5ad\n", "row 1 (sample 'A'): path does not exist"),
        ("sample,path,batch\nA,data/a.h5ad,b 1\n", "column 'batch'"),
        ("sample,path\nA,data/notes.txt\n", "row 1 (sample 'A'): unknown input format '.txt'"),
        ("sample,path\nA,data/b_mtx\n", "row 1 (sample 'A'): directory is not a 10x matrix directory"),
    ],
    ids=["missing-column", "unknown-column", "duplicate", "missing-file", "space-in-batch", "unknown-format",
         "empty-10x-dir"],
)
def test_check_refuses_a_bad_sheet_with_one_line_naming_it(inputs, text, message):
    (inputs / "data" / "notes.txt").write_text("x")
    sheet = _sheet(inputs, text)
    result = _check(sheet)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {sheet}: ") and message in errors[0], result.output


def test_bin_scfm_samplesheet_is_scfm_samplesheet(scfm_bin, tmp_path):
    sheet = REPO / "assets" / "demo" / "samplesheet.csv"
    ok = scfm_bin("samplesheet", "check", sheet)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("every input found")
    bad = _sheet(tmp_path, "sample,path\nA,nothing.h5ad\n")
    refused = scfm_bin("samplesheet", "check", bad, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        f"error: {bad}: row 1 (sample 'A'): path does not exist: {tmp_path / 'nothing.h5ad'}"]
