"""Read-depth enhancement: the model's expression of every cell at a higher (or chosen) sequencing depth.

The prediction is the decoder output at target depth T (``scfm.tasks.embed.predict_expression``),
on the model's scale: log1p of counts per 10k. It is written as a dense cells x genes layer.

Evaluation, on real cells of the input (``evaluate_enhancement``): each cell's counts are binomially
thinned to ``thin_fraction`` of their reads; the model sees only the thinned cell and predicts it at
the original depth (target ``f<1/thin_fraction>``, i.e. the thinned total scaled back up). Per cell,
across the genes measured in the input, we report the Pearson and Spearman correlation with the
original profile (log1p CP10k) of (a) the prediction and (b) the thinned input itself. Enhancement
helps only where (a) beats (b); an untrained or tiny model may well lose, and the numbers say so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scfm.errors import ScfmError, ScfmUsageError

DEFAULT_LAYER = "scfm_enhanced"


def log_cp10k(counts: sp.csr_matrix) -> np.ndarray:
    """Dense log1p(counts per 10k) of a few cells (the model's expression scale)."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    totals = np.asarray(counts.sum(axis=1)).ravel()
    scaled = sp.diags(1e4 / np.maximum(totals, 1e-12)) @ counts
    return np.log1p(scaled.toarray())


def thin_counts(counts: sp.csr_matrix, fraction: float, rng: np.random.Generator) -> sp.csr_matrix:
    """Keep each read with probability ``fraction`` (binomial thinning: a shallower run of the same cells)."""
    thinned = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    thinned.data = rng.binomial(np.rint(thinned.data).astype(np.int64), fraction).astype(np.float32)
    thinned.eliminate_zeros()
    return thinned


def per_cell_correlations(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson and Spearman correlation of each row of ``predicted`` with the same row of ``truth``."""
    from scipy.stats import pearsonr, spearmanr

    pearson = np.array([pearsonr(p, t).statistic for p, t in zip(predicted, truth)])
    spearman = np.array([spearmanr(p, t).statistic for p, t in zip(predicted, truth)])
    return pearson, spearman


def _summary(values: np.ndarray) -> dict:
    finite = values[np.isfinite(values)]
    if not finite.size:
        return {"mean": float("nan"), "median": float("nan")}  # h5ad cannot store None
    return {"mean": float(finite.mean()), "median": float(np.median(finite))}


def evaluate_enhancement(
    model, counts: sp.csr_matrix, *, thin_fraction: float = 0.2, n_cells: int = 200, seed: int = 0,
    batch_size: int = 4, device: str = "auto", precision: str = "auto", quiet: bool = True,
) -> dict:
    """Thin real cells, predict them back at the original depth, and compare with the originals."""
    from scfm.tasks.embed import predict_expression
    from scfm.utils import progress

    rng = np.random.default_rng(seed)
    counts = sp.csr_matrix(counts, dtype=np.float32)
    chosen = np.sort(rng.choice(counts.shape[0], size=min(n_cells, counts.shape[0]), replace=False))
    original = counts[chosen]
    thinned = thin_counts(original, thin_fraction, rng)
    alive = np.asarray(thinned.sum(axis=1)).ravel() > 0  # a cell thinned to nothing cannot be predicted
    original, thinned, chosen = original[alive], thinned[alive], chosen[alive]
    if original.shape[0] < 2:
        raise ScfmError(f"fewer than two cells keep any counts after thinning to {thin_fraction}")
    measured = np.flatnonzero(np.asarray((counts > 0).sum(axis=0)).ravel() > 0)

    fold = 1.0 / thin_fraction
    with progress(total=original.shape[0], desc="enhance: evaluation", unit="cells", quiet=quiet) as bar:
        predicted = predict_expression(model, thinned, target_depth=f"f{fold:g}", batch_size=batch_size,
                                       device=device, precision=precision, progress=bar)
    truth = log_cp10k(original)[:, measured]
    model_pearson, model_spearman = per_cell_correlations(predicted[:, measured], truth)
    input_pearson, input_spearman = per_cell_correlations(log_cp10k(thinned)[:, measured], truth)
    return {
        "n_cells": int(original.shape[0]),
        "n_genes_compared": int(len(measured)),
        "thin_fraction": float(thin_fraction),
        "target_depth": f"f{fold:g}",
        "mean_original_total": float(original.sum() / original.shape[0]),
        "mean_thinned_total": float(thinned.sum() / thinned.shape[0]),
        "pearson": {"prediction": _summary(model_pearson), "thinned_input": _summary(input_pearson)},
        "spearman": {"prediction": _summary(model_spearman), "thinned_input": _summary(input_spearman)},
        "prediction_beats_thinned_input": {
            "pearson_fraction_of_cells": float(np.mean(model_pearson > input_pearson)),
            "spearman_fraction_of_cells": float(np.mean(model_spearman > input_spearman)),
        },
        "cells": chosen.tolist(),
    }


def read_aligned(input_path, vocab):
    """An h5ad in the checkpoint's vocabulary order (aligned on the fly when it is not yet)."""
    import anndata as ad

    from scfm.data.align import align_adata

    from scfm.data.io import check_values

    try:
        adata = ad.read_h5ad(input_path)
    except Exception as exc:
        raise ScfmError(f"cannot read as h5ad ({type(exc).__name__}: {exc})", input_path) from exc
    if adata.n_obs == 0:
        raise ScfmError("input has zero cells", input_path)
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    if not check_values(counts.data, input_path, "X"):  # before alignment sums genes together
        raise ScfmError("X does not hold raw counts (enhancement needs integer counts, e.g. an aligned h5ad)",
                        input_path)
    if list(map(str, adata.var_names)) != vocab.genes:
        try:
            adata, _ = align_adata(adata, vocab, min_coverage=0.3)
        except ScfmError as exc:
            raise ScfmError(exc.message, input_path) from exc
        counts = sp.csr_matrix(adata.X, dtype=np.float32)
    empty = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() <= 0)
    if empty.size:
        raise ScfmError(f"{empty.size} cell(s) have no counts in the vocabulary's genes (run scfm qc first)",
                        input_path)
    adata.X = counts
    return adata


def enhance_file(
    input_path, output_path, checkpoint, *, version: str = "rde", vocab=None, target_depth: str = "a1",
    layer: str = DEFAULT_LAYER, evaluate: bool = True, thin_fraction: float = 0.2, eval_cells: int = 200,
    batch_size: int = 8, device: str = "auto", precision: str = "auto", seed: int = 0, quiet: bool = False,
) -> dict:
    """Write INPUT + ``layers[layer]`` (predicted log1p CP10k at ``target_depth``); return settings + evaluation.

    The precision is decided once, on the input's first cells (:func:`scfm.tasks.embed.decide_precision`), and
    recorded with its reason; the evaluation and the prediction both run in it.
    """
    import h5py

    from scfm.model.checkpoint import load_checkpoint
    from scfm.model.inputs import parse_target_depth
    from scfm.tasks.embed import decide_precision, predict_expression
    from scfm.utils import atomic_output, progress

    if not 0.0 < thin_fraction < 1.0:
        raise ScfmUsageError(f"--thin-fraction must be between 0 and 1 (exclusive), got {thin_fraction}")
    parse_target_depth(target_depth)
    if Path(output_path).suffix.lower() != ".h5ad":
        raise ScfmUsageError(f"output must end in .h5ad, got {Path(output_path).name!r}")
    loaded = load_checkpoint(checkpoint, version=version, vocab=vocab)
    model = loaded.model.float().eval()
    adata = read_aligned(input_path, loaded.vocab)

    settings = {
        "checkpoint": os.fspath(checkpoint), "checkpoint_source": loaded.source.split(":")[0], "version": version,
        "target_depth": target_depth, "layer": layer, "scale": "log1p counts per 10k", "n_cells": int(adata.n_obs),
        "vocab_sha256": loaded.vocab.sha256,
    }
    choice = decide_precision(model, adata.X, precision, device, output="expression", target_depth=target_depth)
    settings.update(choice.as_params())
    precision = choice.precision
    if evaluate:
        settings["evaluation"] = evaluate_enhancement(
            model, adata.X, thin_fraction=thin_fraction, n_cells=eval_cells, seed=seed, batch_size=batch_size,
            device=device, precision=precision, quiet=quiet,
        )
    scfm = dict(adata.uns.get("scfm", {}))
    scfm["enhance"] = settings
    adata.uns["scfm"] = scfm
    with atomic_output(output_path) as tmp:
        adata.write_h5ad(tmp)
        # the prediction is dense (cells x every vocabulary gene): stream it into the file, never into memory
        with h5py.File(tmp, "r+") as handle:
            target = dense_layer_dataset(handle, layer, (adata.n_obs, len(loaded.vocab)))
            with progress(total=adata.n_obs, desc="enhance", unit="cells", quiet=quiet) as bar:
                predict_expression(model, adata.X, target_depth=target_depth, batch_size=batch_size, device=device,
                                   precision=precision, progress=bar, out=target)
    return settings


def dense_layer_dataset(handle, name: str, shape: tuple[int, int]):
    """An empty float32 ``layers/<name>`` in an open h5ad, chunked by rows, readable by anndata."""
    layers = handle.require_group("layers")
    if "encoding-type" not in layers.attrs:
        layers.attrs["encoding-type"] = "dict"
        layers.attrs["encoding-version"] = "0.1.0"
    if name in layers:
        del layers[name]  # an earlier enhancement of the same input is replaced
    rows_per_chunk = max(1, min(shape[0], (1 << 20) // max(shape[1], 1)))  # ~4 MB chunks
    chunks = (rows_per_chunk, shape[1]) if shape[0] else None
    dataset = layers.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    dataset.attrs["encoding-type"] = "array"
    dataset.attrs["encoding-version"] = "0.2.0"
    return dataset
