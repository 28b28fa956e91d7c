"""Synthetic Perturb-seq with planted effects (shared by the perturbation tests)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

N_GENES = 40
GENES = [f"G{i:02d}" for i in range(N_GENES)]
PROGRAM = [f"G{i:02d}" for i in range(20, 28)]  # switched on by the planted perturbation
PLANTED = "G01"                                  # its target gene
TARGETS = ["G01", "G02", "G03", "G04", "G05", "G06"]
CONTROL = "non-targeting"


def synthetic_screen(seed: int = 0, *, n_control: int = 200, n_per_guide: int = 60, combos: dict | None = None):
    """Counts of cells under guides ``<target>_g1`` / ``<target>_g2`` (obs 'guide', target in obs 'gene').

    Every guide knocks its target down (its rate x 0.25); the guides of PLANTED also multiply the rate of
    every PROGRAM gene by e^2. Genes share two latent factors so that co-expression has structure.
    ``combos``: {"A+B": n_cells} adds combination cells whose effect is the sum of the singles' log effects.
    """
    rng = np.random.default_rng(seed)
    base = np.log(rng.uniform(2.0, 20.0, size=N_GENES))
    loadings = rng.normal(0, 0.4, size=(2, N_GENES))
    effects = {t: np.zeros(N_GENES) for t in TARGETS}
    for t in TARGETS:
        effects[t][GENES.index(t)] = np.log(0.25)
    effects[PLANTED][[GENES.index(g) for g in PROGRAM]] += 2.0
    labels, genes, blocks = [], [], []

    def draw(n, effect):
        factors = rng.normal(size=(n, 2))
        depth = rng.uniform(0.7, 1.3, size=(n, 1))
        rate = np.exp(base + factors @ loadings + effect) * depth
        return rng.poisson(rate)

    blocks.append(draw(n_control, 0.0))
    labels += [CONTROL] * n_control
    genes += [CONTROL] * n_control
    for t in TARGETS:
        for g in (1, 2):
            blocks.append(draw(n_per_guide, effects[t]))
            labels += [f"{t}_g{g}"] * n_per_guide
            genes += [t] * n_per_guide
    for combo, n in (combos or {}).items():
        parts = combo.split("+")
        blocks.append(draw(n, sum(effects[p] for p in parts)))
        labels += [combo] * n
        genes += [combo] * n
    counts = np.vstack(blocks).astype(np.float32)
    keep = counts.sum(axis=1) > 0
    obs = pd.DataFrame({"guide": labels, "gene": genes}, index=[f"cell{i}" for i in range(len(labels))])
    adata = ad.AnnData(X=sp.csr_matrix(counts[keep]), obs=obs[keep], var=pd.DataFrame(index=GENES))
    adata.obs["guide"] = adata.obs["guide"].astype("category")
    adata.obs["gene"] = adata.obs["gene"].astype("category")
    return adata
