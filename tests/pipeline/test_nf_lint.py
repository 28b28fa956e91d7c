"""Lint the pipeline with the real Nextflow language server (nf-lang), since Nextflow cannot run here."""

from __future__ import annotations

from pathlib import Path

import pytest

from nf_lsp import ERROR, WARNING, NextflowLanguageServer

REPO = Path(__file__).resolve().parents[2]

SETTINGS = {
    "errorReportingMode": "warnings",
    # setting the excludes also makes the server (re)scan the workspace, which it only does on a change
    "files": {"exclude": [".git", ".venv", "work", ".nextflow", "results", "results_test"]},
}

# Warnings we accept, each with the reason. Keyed on (file relative to the repo, message).
ALLOWED_WARNINGS: dict[tuple[str, str], str] = {}


def pipeline_files() -> list[Path]:
    files = [REPO / "main.nf", REPO / "nextflow.config"]
    files += sorted((REPO / "workflows").glob("*.nf"))
    files += sorted((REPO / "subworkflows").rglob("*.nf"))
    files += sorted((REPO / "modules").rglob("*.nf"))
    files += sorted((REPO / "conf").glob("*.config"))
    return files


@pytest.fixture(scope="module")
def diagnostics():
    files = pipeline_files()
    with NextflowLanguageServer(REPO, settings=SETTINGS) as server:
        return server.check(files)


def test_pipeline_files_exist():
    names = {p.relative_to(REPO).as_posix() for p in pipeline_files()}
    for expected in ["main.nf", "workflows/scfm.nf", "nextflow.config", "conf/base.config", "conf/modules.config",
                     "conf/test.config", "conf/gpu.config", "conf/slurm.config"]:
        assert expected in names
    steps = {p.parent.name for p in (REPO / "modules" / "local").glob("*/main.nf")}
    assert {"mlflow_init", "qc", "vocab", "align", "pretrain", "finetune", "embed", "annotate", "report"} <= steps


def test_server_checked_every_file(diagnostics):
    unchecked = [str(p) for p, found in diagnostics.items() if found is None]
    assert not unchecked, f"the language server published no diagnostics for: {unchecked}"


def test_no_errors(diagnostics):
    errors = [str(d) for found in diagnostics.values() for d in found or [] if d.severity == ERROR]
    assert not errors, "Nextflow language server errors:\n" + "\n".join(errors)


def test_no_unexplained_warnings(diagnostics):
    unexplained = [
        str(d) for path, found in diagnostics.items() for d in found or []
        if d.severity == WARNING and (path.relative_to(REPO).as_posix(), d.message) not in ALLOWED_WARNINGS
    ]
    assert not unexplained, "new warnings (fix them, or allow them with a reason):\n" + "\n".join(unexplained)


def test_allow_list_is_current(diagnostics):
    """An allowed warning that no longer appears is removed from the list, so the list stays honest."""
    seen = {(p.relative_to(REPO).as_posix(), d.message) for p, found in diagnostics.items() for d in found or []}
    stale = [key for key in ALLOWED_WARNINGS if key not in seen]
    assert not stale, f"allowed warnings no longer reported: {stale}"


BROKEN_SCRIPT = """\
process SAY {
    input:
    val x

    script:
    \"\"\"
    echo ${x}
    \"\"\"
}

workflow {
    SAY(channel.of(1)
    not valid here
}
"""

BROKEN_CONFIG = """\
process {
    withLabel: 'x' {
        cpus = 2
"""


def test_client_reports_errors_in_a_broken_script(tmp_path):
    """The client can fail: a syntax error comes back as an error diagnostic on the right file."""
    script = tmp_path / "broken.nf"
    script.write_text(BROKEN_SCRIPT)
    config = tmp_path / "nextflow.config"
    config.write_text(BROKEN_CONFIG)
    with NextflowLanguageServer(tmp_path, settings=SETTINGS) as server:
        found = server.check([script, config])
    script_errors = [d for d in found[script.resolve()] if d.severity == ERROR]
    assert script_errors, f"no error reported for {script}: {found}"
    assert all(d.line >= 12 for d in script_errors), [str(d) for d in script_errors]
    assert any(d.severity == ERROR for d in found[config.resolve()]), found
