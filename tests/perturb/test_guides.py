"""Guide assignment: the threshold, the margin over the second guide, the target mapping, the CLI."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from scfm.cli import cli
from scfm.tasks.perturb.guides import UNASSIGNED, assign_guides

GUIDES = ["A_g1", "A_g2", "B_g1", "NT_1"]


def test_top_guide_needs_the_umi_threshold_and_the_margin():
    counts = np.array([
        [10, 0, 0, 0],   # clear
        [4, 0, 0, 0],    # below 5 UMIs
        [10, 6, 0, 0],   # second guide too close (10 < 2 x 6)
        [12, 6, 0, 0],   # exactly 2x: assigned
        [0, 0, 0, 0],    # no guide
        [7, 7, 0, 0],    # a tie is never assigned
        [0, 0, 1, 30],   # control guide
    ])
    result = assign_guides(sp.csr_matrix(counts), GUIDES, min_umi=5, min_ratio=2.0)
    assert result["guide"].tolist() == ["A_g1", UNASSIGNED, UNASSIGNED, "A_g1", UNASSIGNED, UNASSIGNED, "NT_1"]
    assert result["guide_umi"].tolist() == [10, 4, 10, 12, 0, 7, 30]
    assert result["second_umi"].tolist() == [0, 0, 6, 6, 0, 7, 1]
    # a laxer margin assigns the close call; dense input gives the same answer
    lax = assign_guides(counts, GUIDES, min_umi=5, min_ratio=1.5)
    assert lax["guide"].tolist()[2] == "A_g1"


def test_bad_margin_and_names_are_refused():
    from scfm.errors import ScfmError

    with pytest.raises(ScfmError, match="margin"):
        assign_guides(np.ones((2, 4)), GUIDES, min_ratio=0.5)
    with pytest.raises(ScfmError, match="guide names"):
        assign_guides(np.ones((2, 3)), GUIDES)


@pytest.fixture
def guide_files(tmp_path):
    cells = ad.AnnData(X=sp.csr_matrix(np.ones((4, 3), dtype=np.float32)),
                       obs=pd.DataFrame(index=["c1", "c2", "c3", "c4"]), var=pd.DataFrame(index=["x", "y", "z"]))
    cells.write_h5ad(tmp_path / "cells.h5ad")
    # c4 has no guide counts at all; the table lists the cells in another order
    pd.DataFrame([[0, 9, 0, 0], [20, 1, 0, 0], [0, 0, 0, 8]], index=["c2", "c1", "c3"],
                 columns=GUIDES).to_csv(tmp_path / "guides.csv")
    pd.DataFrame({"guide": GUIDES, "target": ["A", "A", "B", "non-targeting"]}).to_csv(
        tmp_path / "targets.tsv", sep="\t", index=False)
    return tmp_path


def test_assign_cli_writes_the_target_column(guide_files):
    out = guide_files / "labelled.h5ad"
    result = CliRunner().invoke(cli, [
        "perturb", "assign", str(guide_files / "cells.h5ad"), "-o", str(out), "--guide-counts",
        str(guide_files / "guides.csv"), "--guide-targets", str(guide_files / "targets.tsv"), "--key", "gene",
        "--mlflow-uri", f"sqlite:///{guide_files}/mlflow.db"])
    assert result.exit_code == 0, result.output
    labelled = ad.read_h5ad(out)
    assert labelled.obs["gene"].astype(str).tolist() == ["A", "A", "non-targeting", UNASSIGNED]
    assert labelled.obs["gene_guide"].astype(str).tolist() == ["A_g1", "A_g2", "NT_1", UNASSIGNED]
    assert labelled.obs["gene_guide_umi"].tolist() == [20, 9, 8, 0]
    assert labelled.uns["scfm"]["perturb_assign"]["min_umi"] == 5


def test_assign_refuses_a_guide_without_target(guide_files):
    pd.DataFrame({"guide": GUIDES[:3], "target": ["A", "A", "B"]}).to_csv(
        guide_files / "partial.tsv", sep="\t", index=False)
    out = guide_files / "labelled.h5ad"
    result = CliRunner().invoke(cli, [
        "perturb", "assign", str(guide_files / "cells.h5ad"), "-o", str(out), "--guide-counts",
        str(guide_files / "guides.csv"), "--guide-targets", str(guide_files / "partial.tsv"),
        "--mlflow-uri", f"sqlite:///{guide_files}/mlflow.db"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"error: {guide_files / 'partial.tsv'}: 1 guide(s) have no target in the guide → target table (first: NT_1)")
    assert not out.exists()


def test_assign_refuses_guide_counts_of_other_cells(guide_files):
    pd.DataFrame([[1, 9, 0, 0]], index=["zz"], columns=GUIDES).to_csv(guide_files / "other.csv")
    out = guide_files / "labelled.h5ad"
    result = CliRunner().invoke(cli, [
        "perturb", "assign", str(guide_files / "cells.h5ad"), "-o", str(out), "--guide-counts",
        str(guide_files / "other.csv"), "--guide-targets", str(guide_files / "targets.tsv"),
        "--mlflow-uri", f"sqlite:///{guide_files}/mlflow.db"])
    assert result.exit_code == 1 and "no cell of cells.h5ad is in the guide counts" in result.output
    assert not out.exists()
