"""Batched, length-bucketed, streaming cell embeddings and decoder outputs.

    embed_cells(model, counts, *, totals=None, pool="all", target_depth="t4", pre_normalized="F",
                batch_size=64, device="auto", precision="auto", progress=None,
                chunk_size=4096, max_tokens=None, out=None) -> np.ndarray        # (cells, 4d | d)
    predict_expression(model, counts, *, target_depth="t4", ...) -> np.ndarray  # (cells, n_genes)
    gene_embeddings(model, counts, *, target_depth="t4", ...) -> np.ndarray     # (cells, n_genes, decoder_dim)
    decoder_batches(model, counts, *, output="genes", ...) -> iterator of (rows, normalised, values) per batch
    embed_file(input_path, output_path, checkpoint, ...) -> dict                 # what `scfm embed` runs
    checkpoint_sha256(checkpoint, version="ce") -> str                          # identity of the loaded weights

``counts`` is cells x genes in the model's vocabulary order: a scipy CSR matrix, or anything with
``.shape`` whose row slices ``counts[a:b]`` give a sparse or dense block (e.g. :class:`H5adRows`,
an ``.h5ad`` matrix read from disk block by block). Cells are processed ``chunk_size`` at a time;
inside a chunk they are sorted by number of nonzero genes and batched, so padding costs little, and
the results are written back in input order (into ``out`` when given: an array, memmap or HDF5
dataset, so that memory does not grow with the number of cells). No dense cells x genes table is
built for the encoder. Precision ``auto`` is bf16 autocast on CUDA; on a CPU it is bf16 only where
the CPU has native bf16 and a check on the input's first cells keeps every per-cell cosine to fp32 at
or above 0.999, and the encoder is wide enough for bf16 to pay; fp32 otherwise
(:mod:`scfm.model.precision`; :func:`decide_precision` says which and why).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from scfm.errors import ScfmError, ScfmUsageError
from scfm.model import inputs as model_inputs
from scfm.model.checkpoint import checkpoint_sha256  # noqa: F401  (part of this module's interface)
from scfm.model.precision import (PrecisionChoice, announce, choose_precision, cpu_native_bf16,
                                  min_row_cosine)
from scfm.model.xtrimogene import POOLS, XTrimoGene

OUTPUT_TYPES = ("cell", "gene", "gene-expression")
DEVICES = ("auto", "cpu", "cuda")
BULK_TARGET_DEPTH = "T=S"  # recorded for bulk input, whose T token is its S token (no target depth)
# cells the bf16 check runs in both precisions: enough to catch a model that bf16 spoils, cheap next to
# any real input (the decoder outputs cover every gene, so fewer cells there)
PROBE_CELLS = {"cell": 16, "expression": 4, "genes": 2}
_PASS_OF_OUTPUT = {"cell": "cell", "gene-expression": "expression", "gene": "genes"}


def _unwrap(model) -> XTrimoGene:
    return getattr(model, "model", model)  # a LoadedModel works too


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ScfmError("--device cuda was requested but no CUDA device is available")
    if device not in DEVICES:
        raise ScfmError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision without measuring the model: ``auto`` is bf16 on CUDA, fp32 on a CPU."""
    return choose_precision(precision, device.type, native_bf16=cpu_native_bf16).precision


def decide_precision(model, counts, precision: str = "auto", device: str = "auto", *, output: str = "cell",
                     pool: str = "all", totals=None, target_depth: str = "t4", pre_normalized: str = "F",
                     input_type: str = "singlecell", native_bf16=cpu_native_bf16) -> PrecisionChoice:
    """The precision a pass over ``counts`` runs in, and why; ``output``: cell | expression | genes.

    On a CPU with native bf16 (``native_bf16()``) and an encoder wide enough for bf16 to pay, ``auto``
    runs the first few cells in fp32 and in bf16 and keeps bf16 when every per-cell cosine reaches
    0.999. An explicit ``bf16`` on a CPU without native bf16 prints a one-line warning.
    """
    dev = resolve_device(device)

    def measured_cosine() -> float:
        n = min(PROBE_CELLS[output], counts.shape[0])
        if n == 0:
            return 1.0  # nothing to run, nothing to lose
        sample = _row_block(counts, 0, n)
        common = dict(totals=None if totals is None else np.asarray(totals)[:n], target_depth=target_depth,
                      pre_normalized=pre_normalized, input_type=input_type, device=str(dev), batch_size=n)
        if output == "cell":
            runs = [embed_cells(model, sample, pool=pool, precision=p, **common) for p in ("fp32", "bf16")]
        else:
            runs = [_decoder_pass(model, sample, output, precision=p, progress=None, chunk_size=n, out=None, **common)
                    for p in ("fp32", "bf16")]
        return min_row_cosine(*runs)

    return announce(choose_precision(precision, dev.type, native_bf16=native_bf16, bf16_cosine=measured_cosine,
                                     encoder_dim=_unwrap(model).config.encoder_dim))


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _row_block(counts, start: int, stop: int) -> sp.csr_matrix:
    block = counts[start:stop]
    return block if sp.issparse(block) else sp.csr_matrix(np.asarray(block))


def bulk_target_sum(counts, input_type: str, pre_normalized: str, chunk_size: int = 4096) -> float | None:
    """Bulk raw input is scaled to the median total of the whole input (one extra pass over its rows)."""
    model_inputs.check_input_type(input_type, pre_normalized)
    if input_type != "bulk" or pre_normalized != "F":
        return None
    n_rows = counts.shape[0]
    totals = np.concatenate([np.asarray(_row_block(counts, a, min(a + chunk_size, n_rows)).sum(axis=1)).ravel()
                             for a in range(0, n_rows, chunk_size)] or [np.zeros(0)])
    return model_inputs.bulk_target_sum(totals)


def _chunk_inputs(counts, start, stop, totals, pre_normalized, target_depth, input_type="singlecell",
                  target_sum=None):
    block = _row_block(counts, start, stop)
    if input_type == "bulk":
        return model_inputs.normalize_bulk(block, target_sum=target_sum, pre_normalized=pre_normalized,
                                           row_offset=start)
    chunk_totals = None if totals is None else np.asarray(totals)[start:stop]
    normalised, raw_totals = model_inputs.normalize_counts(block, totals=chunk_totals, pre_normalized=pre_normalized,
                                                           row_offset=start)
    target, source = model_inputs.depth_tokens(raw_totals, target_depth)
    return normalised, target, source


def embed_cells(
    model,
    counts,
    *,
    totals=None,
    pool: str = "all",
    target_depth: str = "t4",
    pre_normalized: str = "F",
    batch_size: int = 64,
    device: str = "auto",
    precision: str = "auto",
    progress=None,
    chunk_size: int = 4096,
    max_tokens: int | None = None,
    out=None,
    input_type: str = "singlecell",
) -> np.ndarray:
    """Cell embeddings (cells, 4*d) for ``pool="all"`` or (cells, d) for ``"max"``, float32.

    ``progress``: an object with ``update(n_cells)`` (e.g. ``scfm.utils.progress(total=n)``) or None.
    ``max_tokens`` caps cells x padded length per batch (defaults to ``batch_size`` x 2048).
    ``input_type="bulk"`` sets ``T = S`` from the sample's expression and ignores ``target_depth``
    (see :mod:`scfm.model.inputs`).
    """
    net = _unwrap(model)
    if pool not in POOLS:
        raise ScfmError(f"unknown pool {pool!r} (choose from {', '.join(POOLS)})")
    model_inputs.parse_target_depth(target_depth)
    dev = resolve_device(device)
    n_cells, n_genes = counts.shape
    _check_width(n_genes, net.config.n_genes)
    prec = decide_precision(net, counts, precision, str(dev), output="cell", pool=pool, totals=totals,
                            target_depth=target_depth, pre_normalized=pre_normalized,
                            input_type=input_type).precision
    dim = net.config.encoder_dim * (4 if pool == "all" else 1)
    target_sum = bulk_target_sum(counts, input_type, pre_normalized, chunk_size)
    if out is None:
        out = np.empty((n_cells, dim), dtype=np.float32)
    max_tokens = max_tokens or batch_size * 2048
    # fp32 on a CPU measured faster computing only real tokens, bf16 there and CUDA faster with one padded
    # batched kernel (bench/RESULTS.md)
    encode = net.encode_packed if dev.type == "cpu" and prec == "fp32" else net.encode
    was_training = net.training
    net.eval().to(dev)
    try:
        with torch.no_grad(), _autocast(dev, prec):
            for start in range(0, n_cells, chunk_size):
                stop = min(start + chunk_size, n_cells)
                normalised, target, source = _chunk_inputs(counts, start, stop, totals, pre_normalized, target_depth,
                                                           input_type, target_sum)
                n_tokens = np.diff(normalised.indptr) + 2  # upper bound (positives only are kept)
                result = np.empty((stop - start, dim), dtype=np.float32)
                pending = None
                for rows in model_inputs.length_buckets(n_tokens, batch_size, max_tokens):
                    enc = model_inputs.encoder_inputs_from_csr(normalised, target, source, net.config, rows).to(dev)
                    encoded = encode(enc.values, enc.gene_ids, enc.padding_mask)
                    # on a GPU the kernels above are only queued: collect the previous batch now, so the
                    # host prepares the next batch while the device still works on this one
                    _collect(pending, result, progress)
                    pending = rows, net.cell_embedding(encoded, enc, pool)
                _collect(pending, result, progress)
                _check_finite(result, start)
                out[start:stop] = result
    finally:
        net.train(was_training)
    return out


def _collect(pending, result: np.ndarray, progress) -> None:
    if pending is None:
        return
    rows, embedding = pending
    result[rows] = embedding.float().cpu().numpy()
    if progress is not None:
        progress.update(len(rows))


def _check_finite(values: np.ndarray, first_row: int) -> None:
    """Never write a NaN embedding quietly: finite inputs and weights give finite outputs."""
    bad = np.flatnonzero(~np.isfinite(values.reshape(len(values), -1)).all(axis=1))
    if bad.size:
        raise ScfmError(f"the model gave NaN or infinite outputs for {bad.size} cell(s) (first: row "
                        f"{first_row + int(bad[0])}); the checkpoint or the input values are broken")


def _check_width(n_genes: int, expected: int) -> None:
    if n_genes != expected:
        raise ScfmError(f"the matrix has {n_genes} genes but the model's vocabulary has {expected}; "
                        "align the input to the checkpoint's vocabulary first (scfm align)")


def decoder_batches(model, counts, *, output: str = "genes", totals=None, target_depth: str = "t4",
                    pre_normalized: str = "F", batch_size: int = 2, device: str = "auto", precision: str = "auto",
                    chunk_size: int = 1024, input_type: str = "singlecell"):
    """Run cells through encoder and decoder ``batch_size`` at a time, in input order.

    Yields ``(rows, normalised, values)`` per batch: the batch's row indices in ``counts``, its normalised
    expression (CSR, cells x n_genes) and, on the device, the decoder's gene embeddings (cells, n_genes,
    decoder_dim) for ``output="genes"`` or its expression output (cells, n_genes) for ``"expression"``.
    Callers reduce each batch before asking for the next, so nothing of size cells x genes x dims is held.
    """
    if output not in ("genes", "expression"):
        raise ValueError(f"output must be 'genes' or 'expression', got {output!r}")
    net = _unwrap(model)
    model_inputs.parse_target_depth(target_depth)
    dev = resolve_device(device)
    n_cells, n_genes = counts.shape
    cfg = net.config
    _check_width(n_genes, cfg.n_genes)
    prec = decide_precision(net, counts, precision, str(dev), output=output, totals=totals,
                            target_depth=target_depth, pre_normalized=pre_normalized, input_type=input_type).precision
    target_sum = bulk_target_sum(counts, input_type, pre_normalized, chunk_size)
    was_training = net.training
    net.eval().to(dev)
    try:
        with torch.no_grad(), _autocast(dev, prec):
            for start in range(0, n_cells, chunk_size):
                stop = min(start + chunk_size, n_cells)
                normalised, target, source = _chunk_inputs(counts, start, stop, totals, pre_normalized, target_depth,
                                                           input_type, target_sum)
                for first in range(0, stop - start, batch_size):
                    rows = np.arange(first, min(first + batch_size, stop - start))
                    batch = model_inputs.decoder_batch_from_csr(normalised, target, source, cfg, rows).to(dev)
                    enc = batch.encoder
                    genes = net.decode(net.encode(enc.values, enc.gene_ids, enc.padding_mask), batch)
                    values = net.head(genes).squeeze(-1) if output == "expression" else genes
                    yield start + rows, normalised[rows], values[:, : cfg.n_genes]
    finally:
        net.train(was_training)


def _decoder_pass(model, counts, kind, *, totals, target_depth, pre_normalized, batch_size, device, precision,
                  progress, chunk_size, out, input_type="singlecell"):
    net = _unwrap(model)
    cfg = net.config
    n_cells = counts.shape[0]
    shape = (n_cells, cfg.n_genes) if kind == "expression" else (n_cells, cfg.n_genes, cfg.decoder_dim)
    batches = decoder_batches(net, counts, output=kind, totals=totals, target_depth=target_depth,
                              pre_normalized=pre_normalized, batch_size=batch_size, device=device,
                              precision=precision, chunk_size=chunk_size, input_type=input_type)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    for rows, _, values in batches:
        values = values.float().cpu().numpy()
        _check_finite(values, int(rows[0]))
        out[rows[0] : rows[-1] + 1] = values
        if progress is not None:
            progress.update(len(rows))
    return out


def predict_expression(model, counts, *, target_depth: str = "t4", totals=None, pre_normalized: str = "F",
                       batch_size: int = 4, device: str = "auto", precision: str = "auto", progress=None,
                       chunk_size: int = 1024, out=None, input_type: str = "singlecell") -> np.ndarray:
    """The decoder's expression output (cells, n_genes), float32, at the requested target depth.

    Values are on the model's scale (log1p of counts per 10k at depth T); ``scfm enhance`` uses the
    ``rde`` model with e.g. ``target_depth="a1"``. The decoder covers every gene, so cells go through
    it ``batch_size`` at a time.
    """
    return _decoder_pass(model, counts, "expression", totals=totals, target_depth=target_depth,
                         pre_normalized=pre_normalized, batch_size=batch_size, device=device, precision=precision,
                         progress=progress, chunk_size=chunk_size, out=out, input_type=input_type)


def gene_embeddings(model, counts, *, target_depth: str = "t4", totals=None, pre_normalized: str = "F",
                    batch_size: int = 2, device: str = "auto", precision: str = "auto", progress=None,
                    chunk_size: int = 1024, out=None, input_type: str = "singlecell") -> np.ndarray:
    """Context-specific gene embeddings (cells, n_genes, decoder_dim) from the decoder, float32."""
    return _decoder_pass(model, counts, "genes", totals=totals, target_depth=target_depth,
                         pre_normalized=pre_normalized, batch_size=batch_size, device=device, precision=precision,
                         progress=progress, chunk_size=chunk_size, out=out, input_type=input_type)


# -------------------------------------------------------------------------------- .h5ad streaming
class NotCountsError(ScfmError):
    def __init__(self, path):
        super().__init__("X has non-integer values where raw counts are required (log-normalised data? give the raw "
                         "counts, or --pre-normalized T for log1p-normalised values)", path)


class H5adRows:
    """Row blocks of an ``.h5ad`` matrix (CSR group or dense dataset) read from disk on demand.

    ``check`` validates every block as it is read: ``"counts"`` (raw counts: non-negative integers),
    ``"values"`` (non-negative and finite, e.g. normalised values) or None.
    """

    def __init__(self, node, path, check: str | None = None):
        import h5py

        self.node, self.path, self.check = node, path, check
        if isinstance(node, h5py.Dataset):
            self.dense = True
            self.shape = tuple(node.shape)
        else:
            encoding = node.attrs.get("encoding-type", "")
            if isinstance(encoding, bytes):
                encoding = encoding.decode()
            if encoding != "csr_matrix":
                raise ScfmError(f"X is stored as {encoding or 'an unknown type'}; expected CSR (run scfm align)", path)
            self.dense = False
            self.shape = tuple(int(x) for x in node.attrs["shape"])
            self.indptr = node["indptr"]

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        start, stop, _ = rows.indices(self.shape[0])
        if self.dense:
            block = sp.csr_matrix(np.asarray(self.node[start:stop], dtype=np.float32))
        else:
            ptr = np.asarray(self.indptr[start : stop + 1], dtype=np.int64)
            data = np.asarray(self.node["data"][ptr[0] : ptr[-1]], dtype=np.float32)
            indices = np.asarray(self.node["indices"][ptr[0] : ptr[-1]], dtype=np.int64)
            block = sp.csr_matrix((data, indices, ptr - ptr[0]), shape=(stop - start, self.shape[1]))
        if self.check is not None:
            from scfm.data.io import check_values

            if not check_values(block.data, self.path, "X") and self.check == "counts":
                raise NotCountsError(self.path)
        return block



def _is_aligned(path: Path, vocab) -> bool:
    import h5py
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as f:
            if "var" not in f or "X" not in f:
                return False
            var = read_elem(f["var"])
            return list(map(str, var.index)) == vocab.genes
    except OSError:
        return False


def check_aligned_input(path: Path, pre_normalized: str, input_type: str = "singlecell") -> None:
    """An input that skips alignment gets the checks alignment runs, before any output is started:
    cells and genes present, no negative, NaN or infinite value, and integer counts unless the values
    are declared normalised (``pre_normalized`` T or A) or are bulk expression (TPM and the like are
    fractional). Every block is checked again as it is read."""
    from scfm.data.io import inspect_h5ad

    info = inspect_h5ad(path, layer="X")  # the first 16M values; zero cells or genes are refused here
    if requires_counts(pre_normalized, input_type) and not info.is_counts:
        raise NotCountsError(path)


def requires_counts(pre_normalized: str, input_type: str) -> bool:
    return pre_normalized == "F" and input_type == "singlecell"


def _array_attrs(dataset) -> None:
    dataset.attrs["encoding-type"] = "array"
    dataset.attrs["encoding-version"] = "0.2.0"


def _new_h5_array(handle, key: str, shape):
    group_name, name = key.split("/")
    group = handle.require_group(group_name)
    if not group.attrs.get("encoding-type"):
        group.attrs["encoding-type"] = "dict"
        group.attrs["encoding-version"] = "0.1.0"
    if name in group:
        del group[name]
    chunks = (min(shape[0], 256),) + tuple(shape[1:]) if shape[0] else None
    dataset = group.create_dataset(name, shape=shape, dtype=np.float32, chunks=chunks)
    _array_attrs(dataset)
    return dataset


def _write_uns_embed(handle, settings: dict) -> None:
    from anndata.io import read_elem, write_elem

    scfm = dict(read_elem(handle["uns/scfm"])) if "uns/scfm" in handle else {}
    scfm["embed"] = settings
    if "uns" not in handle:
        write_elem(handle, "uns", {})
    if "scfm" in handle["uns"]:
        del handle["uns"]["scfm"]
    write_elem(handle["uns"], "scfm", scfm)


def _obs_totals(handle, path) -> np.ndarray:
    from anndata.io import read_elem

    obs = read_elem(handle["obs"])
    if "total_counts" not in obs.columns:
        raise ScfmError("--pre-normalized A needs each cell's raw total count in obs['total_counts']", path)
    return obs["total_counts"].to_numpy(dtype=np.float64)


def default_batch_size(output_type: str, device) -> int:
    """Cells per batch when none is given.

    On a CPU, small batches keep the encoder's activations in cache: for base-100m on a 2-core AVX-512 CPU,
    4 cells per batch ran 1.7x faster than 64 (bench/RESULTS.md). A GPU needs large batches to fill it.
    Decoder outputs span every gene position, so they go 2 cells at a time everywhere.
    """
    if output_type != "cell":
        return 2
    return 64 if str(device).startswith("cuda") else 4


def embed_file(
    input_path,
    output_path,
    checkpoint,
    *,
    vocab=None,
    output_type: str = "cell",
    pool: str = "all",
    target_depth: str = "t4",
    pre_normalized: str = "F",
    version: str = "ce",
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    chunk_size: int = 4096,
    min_coverage: float = 0.3,
    quiet: bool = False,
    input_type: str = "singlecell",
) -> dict[str, Any]:
    """Align INPUT to the checkpoint's vocabulary (unless it already is), embed, write OUTPUT atomically.

    ``.h5ad`` OUTPUT = the aligned data + ``obsm['X_scfm']`` (cell) or ``layers['scfm_expr']``
    (gene-expression), with every setting in ``uns['scfm']['embed']``. ``.npy`` OUTPUT = the array only
    (the only choice for ``gene``: cells x genes x decoder_dim). Returns the settings and timings.
    ``input_type="bulk"``: each row is a bulk sample (T = S, no target depth; see :mod:`scfm.model.inputs`).
    """
    import h5py

    from scfm import __version__
    from scfm.data.align import align_file
    from scfm.model.checkpoint import load_checkpoint
    from scfm.utils import atomic_output, progress as progress_bar

    input_path, output_path = Path(input_path), Path(output_path)
    if output_type not in OUTPUT_TYPES:
        raise ScfmUsageError(f"unknown output type {output_type!r} (choose from {', '.join(OUTPUT_TYPES)})")
    suffix = output_path.suffix.lower()
    if suffix not in (".h5ad", ".npy"):
        raise ScfmUsageError(f"output must end in .h5ad or .npy, got {output_path.name!r}")
    if output_type == "gene" and suffix != ".npy":
        raise ScfmUsageError("--output-type gene writes cells x genes x dims: give an OUT ending in .npy")
    if not input_path.exists():
        raise ScfmError("input not found", input_path)
    if input_path.suffix.lower() != ".h5ad" and pre_normalized != "F":
        raise ScfmError("pre-normalized input (T or A) must be an .h5ad already aligned to the vocabulary", input_path)
    model_inputs.parse_target_depth(target_depth)
    if pre_normalized not in model_inputs.PRE_NORMALIZED_CHOICES:
        raise ScfmUsageError(f"pre_normalized must be one of F, T, A, got {pre_normalized!r}")
    try:
        model_inputs.check_input_type(input_type, pre_normalized)
    except ScfmError as exc:
        raise ScfmUsageError(exc.message) from exc
    dev = resolve_device(device)
    resolve_precision(precision, dev)  # refuse an unknown precision before any work
    if batch_size is None:
        batch_size = default_batch_size(output_type, dev)

    loaded = load_checkpoint(checkpoint, version=version, vocab=vocab)
    net, vocab_obj = loaded.model, loaded.vocab
    settings: dict[str, Any] = {
        "checkpoint": str(checkpoint), "checkpoint_source": loaded.source.split(":")[0], "version": version,
        "checkpoint_sha256": checkpoint_sha256(checkpoint, version),
        "output_type": output_type, "pool": pool, "input_type": input_type,
        "target_depth": target_depth if input_type == "singlecell" else BULK_TARGET_DEPTH,
        "pre_normalized": pre_normalized,
        "batch_size": batch_size, "device": str(dev), "chunk_size": chunk_size,
        "vocab_sha256": vocab_obj.sha256, "n_genes": len(vocab_obj), "scfm_version": __version__,
        "model": loaded.config.to_dict(),
    }

    with atomic_output(output_path) as tmp, tempfile.TemporaryDirectory(dir=output_path.parent, prefix=".scfm-embed-") as scratch:
        aligned_already = input_path.suffix.lower() == ".h5ad" and _is_aligned(input_path, vocab_obj)
        if suffix == ".h5ad":
            staged = tmp
        else:
            staged = input_path if aligned_already else Path(scratch) / "aligned.h5ad"
        if aligned_already:
            check_aligned_input(input_path, pre_normalized, input_type)
            if staged != input_path:
                shutil.copyfile(input_path, staged)
        elif pre_normalized != "F":
            raise ScfmError("pre-normalized input (T or A) must already be aligned to the checkpoint's vocabulary "
                            "(var_names in vocabulary order)", input_path)
        else:
            coverage = align_file(input_path, vocab_obj, out_h5ad=staged, min_coverage=min_coverage,
                                  chunk_size=max(chunk_size, 1), quiet=quiet)
            settings["coverage"] = coverage["fraction_counts_kept"]
        settings["aligned_input"] = aligned_already

        mode = "r" if staged == input_path else "r+"
        with h5py.File(staged, mode) as handle:
            rows = H5adRows(handle["X"], input_path,
                            check="counts" if requires_counts(pre_normalized, input_type) else "values")
            n_cells = rows.shape[0]
            totals = _obs_totals(handle, input_path) if pre_normalized == "A" else None
            choice = decide_precision(net, rows, precision, str(dev), output=_PASS_OF_OUTPUT[output_type], pool=pool,
                                      totals=totals, target_depth=target_depth, pre_normalized=pre_normalized,
                                      input_type=input_type)
            prec = choice.precision
            settings.update(choice.as_params())
            if output_type == "cell":
                shape = (n_cells, net.config.encoder_dim * (4 if pool == "all" else 1))
            elif output_type == "gene-expression":
                shape = (n_cells, net.config.n_genes)
            else:
                shape = (n_cells, net.config.n_genes, net.config.decoder_dim)
            if suffix == ".npy":
                target = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            else:
                target = _new_h5_array(handle, "obsm/X_scfm" if output_type == "cell" else "layers/scfm_expr", shape)
            common = dict(totals=totals, target_depth=target_depth, pre_normalized=pre_normalized,
                          input_type=input_type,
                          batch_size=batch_size, device=str(dev), precision=prec, chunk_size=chunk_size, out=target)
            started = time.perf_counter()
            with progress_bar(total=n_cells, desc="embedding", unit="cells", quiet=quiet) as bar:
                try:
                    if output_type == "cell":
                        embed_cells(net, rows, pool=pool, progress=bar, **common)
                    elif output_type == "gene-expression":
                        predict_expression(net, rows, progress=bar, **common)
                    else:
                        gene_embeddings(net, rows, progress=bar, **common)
                except ScfmError as exc:
                    raise ScfmError(exc.message, input_path) from exc
            seconds = time.perf_counter() - started
            settings.update(n_cells=n_cells, output_shape=list(shape))
            if suffix == ".npy":
                target.flush()
                del target
            else:
                _write_uns_embed(handle, settings)
    return {**settings, "seconds": seconds, "cells_per_s": n_cells / seconds if seconds > 0 else 0.0}
