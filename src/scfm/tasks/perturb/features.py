"""Gene features for the predictor: scfm gene context embeddings, or the ablations' stand-ins.

    scfm_gene_features(model, control_counts, positions, ...) -> (genes, decoder_dim)
    random_gene_features(n_genes, dim, seed) -> (genes, dim)

``scfm``: the decoder's per-cell, per-gene states (what ``scfm embed --output-type gene`` writes) of
control cells, averaged over cells: each gene's context embedding in the unperturbed cell state. The
cells x genes x dims array is never held: the decoder pass writes each batch into a running sum.
``random``: a fixed Gaussian matrix (the ablation keeps the architecture and drops the knowledge).
The third choice, ``learned``, has no fixed features: the predictor learns one embedding per gene
(GEARS without a foundation model).
"""

from __future__ import annotations

import numpy as np

FEATURE_KINDS = ("scfm", "random", "learned")


class _RunningGeneMean:
    """Stands in for the output array of :func:`scfm.tasks.embed.gene_embeddings`: rows written into it
    are summed over cells (only the chosen gene positions), so memory is genes x dims, not cells x it."""

    def __init__(self, n_cells: int, n_vocab: int, dim: int, positions: np.ndarray):
        self.shape = (n_cells, n_vocab, dim)
        self.positions = np.asarray(positions)
        self.total = np.zeros((len(self.positions), dim), dtype=np.float64)
        self.n = 0

    def __setitem__(self, rows, values) -> None:
        values = np.asarray(values)
        self.total += values[:, self.positions].sum(axis=0, dtype=np.float64)
        self.n += values.shape[0]

    def mean(self) -> np.ndarray:
        return (self.total / max(self.n, 1)).astype(np.float32)


def scfm_gene_features(model, control_counts, positions, *, max_cells: int = 1000, seed: int = 0,
                       batch_size: int = 8, device: str = "auto", precision: str = "auto",
                       target_depth: str = "t4", quiet: bool = False) -> np.ndarray:
    """Mean decoder gene states of (at most ``max_cells``, a seeded random subset of) control cells.

    ``control_counts``: raw counts, cells x the model's whole vocabulary; ``positions``: the vocabulary
    positions of the genes to return, in the predictor's gene order.
    """
    from scfm.tasks.embed import gene_embeddings
    from scfm.utils import progress

    net = getattr(model, "model", model)
    n_cells = control_counts.shape[0]
    if n_cells > max_cells:
        rows = np.sort(np.random.default_rng(seed).choice(n_cells, size=max_cells, replace=False))
        control_counts = control_counts[rows]
    sums = _RunningGeneMean(control_counts.shape[0], net.config.n_genes, net.config.decoder_dim, positions)
    with progress(total=control_counts.shape[0], desc="gene context", unit="cells", quiet=quiet) as bar:
        gene_embeddings(net, control_counts, target_depth=target_depth, batch_size=batch_size, device=device,
                        precision=precision, progress=bar, out=sums)
    return sums.mean()


def random_gene_features(n_genes: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n_genes, dim)).astype(np.float32)
