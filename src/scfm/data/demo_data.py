"""Real labelled cells for the demo and the tests, from data that ships inside scanpy.

``scanpy.datasets.pbmc68k_reduced()`` keeps, in ``.raw``, log1p(counts / n_counts * 1e4) for 765 genes,
with ``obs['n_counts']`` the whole-cell total. Inverting that transform and rounding recovers the integer
counts exactly (the float32 round-off is below 0.1 count), giving 700 real PBMCs with cell-type labels
(``obs['bulk_labels']``) and no download.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import scipy.sparse as sp

LABEL_KEY = "bulk_labels"


def pbmc68k_counts() -> ad.AnnData:
    """700 PBMCs x 765 genes, integer counts (CSR float32) in ``X``, labels in ``obs['bulk_labels']``."""
    import scanpy as sc

    reduced = sc.datasets.pbmc68k_reduced()
    raw = reduced.raw.to_adata()
    logged = sp.csr_matrix(raw.X, dtype=np.float64)
    totals = reduced.obs["n_counts"].to_numpy(dtype=np.float64)
    scale = sp.diags(totals / 1e4)
    counts = scale @ logged.expm1()
    counts.data = np.rint(counts.data)
    counts.eliminate_zeros()
    obs = reduced.obs[[LABEL_KEY, "louvain", "phase"]].copy()
    obs[LABEL_KEY] = obs[LABEL_KEY].astype(str).astype("category")
    obs["n_counts_whole_cell"] = totals.astype(np.float32)
    var = raw.var[[]].copy()
    return ad.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs, var=var)
