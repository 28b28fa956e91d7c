"""Synthetic drug-response data where the answer is known (shared by the drug tests)."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

# real molecules, so that RDKit parses them and their fingerprints differ
SMILES = {
    "aspirin": "CC(=O)OC1=CC=CC=C1C(=O)O",
    "caffeine": "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "ibuprofen": "CC(C)CC1=CC=C(C=C1)C(C)C(=O)O",
    "paracetamol": "CC(=O)NC1=CC=C(C=C1)O",
    "imatinib": "CC1=C(C=C(C=C1)NC(=O)C2=CC=C(C=C2)CN3CCN(CC3)C)NC4=NC=CC(=N4)C5=CN=CC=C5",
    "erlotinib": "COCCOC1=C(C=C2C(=C1)C(=NC=N2)NC3=CC=CC(=C3)C#C)OCCOC",
    "gefitinib": "COC1=C(C=C2C(=C1)N=CN=C2NC3=CC(=C(C=C3)F)Cl)OCCCN4CCOCC4",
    "sorafenib": "CNC(=O)C1=NC=CC(=C1)OC2=CC=C(C=C2)NC(=O)NC3=CC(=C(C=C3)Cl)C(F)(F)F",
}


def make_cell_lines(n_lines: int = 150, n_genes: int = 60, seed: int = 0):
    """Expression of cell lines (z-scored-like) with two programs; ln IC50 = drug offset + drug weight x program."""
    rng = np.random.default_rng(seed)
    programs = rng.normal(size=(n_lines, 2))
    loadings = np.zeros((2, n_genes))
    loadings[0, :10] = 1.0
    loadings[1, 10:20] = 1.0
    expression = programs @ loadings + 0.5 * rng.normal(size=(n_lines, n_genes))
    names = [f"LINE{i:03d}" for i in range(n_lines)]
    drugs = list(SMILES)
    offsets = np.linspace(-2, 3, len(drugs))
    weights = np.where(np.arange(len(drugs)) % 2 == 0, 1.5, -1.0)
    which = np.arange(len(drugs)) % 2  # even drugs follow program 0, odd drugs program 1
    rows = []
    for d, drug in enumerate(drugs):
        values = offsets[d] + weights[d] * programs[:, which[d]] + 0.3 * rng.normal(size=n_lines)
        rows += [(names[i], drug, values[i]) for i in range(n_lines)]
    response = pd.DataFrame(rows, columns=["cell_line", "drug", "ln_ic50"])
    adata = ad.AnnData(expression.astype(np.float32))
    adata.obs_names = names
    adata.var_names = [f"G{g}" for g in range(n_genes)]
    return adata, response, programs


def write_inputs(root: Path, adata, response, smiles=SMILES) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(root / "lines.h5ad")
    response.to_csv(root / "response.tsv", sep="\t", index=False)
    pd.DataFrame({"drug": list(smiles), "smiles": list(smiles.values())}).to_csv(root / "smiles.csv", index=False)
    return {"cells": root / "lines.h5ad", "response": root / "response.tsv", "smiles": root / "smiles.csv"}
