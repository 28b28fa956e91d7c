"""Benchmark: streamed QC + alignment (scfm) next to the same steps done in memory with scanpy.

    python bench/qc_align.py                      # 200k cells
    python bench/qc_align.py --cells 50000 --cells 200000 --workdir /tmp/bench

For each size it generates a sparse count matrix (30k genes, ~1,500 nonzero genes per cell, written in
blocks so generation itself needs bounded memory) once, then runs, each in its own process:

* ``scfm``   : ``scfm.data.qc.run_qc`` (streamed, ``--chunk-size``) → ``scfm.data.align.align_file``
               (streamed) → aligned .h5ad;
* ``scanpy`` : ``read_h5ad`` → ``calculate_qc_metrics`` → the same filters (min genes 200, max 20 %
               mitochondrial, genes in ≥ 3 cells) → reindex to the vocabulary → ``write_h5ad``.

Reported per run: wall seconds (work only, imports excluded), input cells/s, and peak RSS of the
process (``ru_maxrss`` from ``os.wait4`` on the child). Both runs must keep the same number of cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_GENES = 30_000
NNZ_PER_CELL = 1_500
N_MITO = 13
VOCAB_FRACTION = 0.6  # share of the input genes that the vocabulary knows
N_VOCAB_EXTRA = 2_000  # vocabulary genes absent from the input


def gene_names() -> list[str]:
    return [f"MT-G{i}" for i in range(N_MITO)] + [f"GENE{i:05d}" for i in range(N_GENES - N_MITO)]


def generate(path: Path, n_cells: int, seed: int = 0, block: int = 5_000) -> None:
    """Counts: gene popularity ~ Zipf-like, cell depth ~ log-normal, value = 1 + Poisson(mean)."""
    import pandas as pd

    from scfm.data.align import AlignedH5adWriter
    from scfm.data.vocab import Vocabulary

    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, N_GENES + 1) ** 0.8
    popularity = rng.permutation(popularity)
    popularity[:N_MITO] *= 20  # mitochondrial genes are highly expressed
    p = popularity / popularity.sum()
    cdf = np.cumsum(p)
    gene_mean = 0.3 + 4.0 * p / p.max()
    writer = AlignedH5adWriter(path, Vocabulary(gene_names()))
    for start in range(0, n_cells, block):
        n = min(block, n_cells - start)
        per_cell = rng.poisson(NNZ_PER_CELL * 1.15, n)  # ~15 % of draws collide and are merged
        rows = np.repeat(np.arange(n), per_cell)
        genes = np.minimum(np.searchsorted(cdf, rng.random(len(rows))), N_GENES - 1)
        keys = np.sort(rows.astype(np.int64) * N_GENES + genes)
        keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # sorted, no repeats
        rows, genes = keys // N_GENES, keys % N_GENES
        depth = rng.lognormal(0.0, 0.5, n)
        values = 1 + rng.poisson(gene_mean[genes] * depth[rows])
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
        import scipy.sparse as sp

        csr = sp.csr_matrix((values.astype(np.float32), genes.astype(np.int32), indptr), shape=(n, N_GENES))
        obs = pd.DataFrame(index=[f"cell{start + i}" for i in range(n)])
        writer.append(csr, obs)
    writer.finish({})


def vocabulary(path: Path, seed: int = 0) -> None:
    from scfm.data.vocab import Vocabulary

    rng = np.random.default_rng(seed + 1)
    names = gene_names()
    known = [names[i] for i in sorted(rng.choice(len(names), int(VOCAB_FRACTION * len(names)), replace=False))]
    Vocabulary(known + [f"EXTRA{i}" for i in range(N_VOCAB_EXTRA)]).save(path)


# ------------------------------------------------------------------------------------------ the two runs
def _import_heavy_modules() -> None:
    """Import what either run pulls in lazily, so that timings measure work, not imports."""
    import anndata  # noqa: F401
    import scanpy  # noqa: F401
    import torch  # noqa: F401


def run_scfm(inp: Path, vocab_path: Path, out: Path, chunk_size: int, min_cells: int = 3,
             shards_dir: Path | None = None) -> dict:
    _import_heavy_modules()
    from scfm.data.align import align_file
    from scfm.data.qc import run_qc
    from scfm.data.vocab import Vocabulary

    started = time.perf_counter()
    qc_path = out.with_name(out.name + ".qc.h5ad")
    summary = run_qc(inp, qc_path, sample="bench", min_genes=200, max_pct_mito=20.0, min_cells=min_cells,
                     chunk_size=chunk_size, quiet=True)
    qc_done = time.perf_counter()
    coverage = align_file(qc_path, Vocabulary.load(vocab_path), out_h5ad=out, shards_dir=shards_dir,
                          chunk_size=chunk_size, quiet=True)
    done = time.perf_counter()
    result = {"seconds": done - started, "qc_seconds": qc_done - started, "align_seconds": done - qc_done,
              "cells_out": coverage["n_cells"], "genes_kept": summary["genes_out"],
              "aligned_h5ad_gib": out.stat().st_size / 2**30}
    if shards_dir is not None:
        parts = sorted(shards_dir.glob("*.parquet"))
        result.update(shards=len(parts), shards_gib=sum(p.stat().st_size for p in parts) / 2**30)
    return result


def run_scanpy(inp: Path, vocab_path: Path, out: Path, chunk_size: int, min_cells: int = 3,
               shards_dir: Path | None = None) -> dict:
    _import_heavy_modules()
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    from scfm.data.vocab import Vocabulary

    started = time.perf_counter()
    adata = sc.read_h5ad(inp)
    adata.var["mt"] = adata.var_names.str.upper().str.startswith("MT-")
    adata.var["ribo"] = adata.var_names.str.upper().str.startswith(("RPS", "RPL"))
    sc.pp.calculate_qc_metrics(adata, qc_vars=["mt", "ribo"], percent_top=None, log1p=False, inplace=True)
    sc.pp.filter_cells(adata, min_genes=200)
    adata = adata[adata.obs["pct_counts_mt"] <= 20.0].copy()
    sc.pp.filter_genes(adata, min_cells=min_cells)
    vocab = Vocabulary.load(vocab_path)
    position = {g: i for i, g in enumerate(vocab.genes)}
    cols = np.array([position.get(g, -1) for g in adata.var_names])
    rows = np.flatnonzero(cols >= 0)
    reindex = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols[rows])), shape=(adata.n_vars, len(vocab)))
    aligned = ad.AnnData(X=sp.csr_matrix(adata.X @ reindex, dtype=np.float32), obs=adata.obs,
                         var=adata.var.iloc[:0].reindex(vocab.genes)[[]])
    aligned.write_h5ad(out)
    return {"seconds": time.perf_counter() - started, "cells_out": int(aligned.n_obs), "genes_kept": int(adata.n_vars)}


RUNS = {"scfm": run_scfm, "scanpy": run_scanpy}


def measure(kind: str, inp: Path, vocab_path: Path, out: Path, chunk_size: int, min_cells: int = 3,
            shards_dir: Path | None = None) -> dict:
    """Run one kind in a fresh process; its peak RSS comes from wait4 on that child alone."""
    cmd = [sys.executable, __file__, "--worker", kind, "--input", str(inp), "--vocab", str(vocab_path),
           "--output", str(out), "--chunk-size", str(chunk_size), "--min-cells", str(min_cells)]
    if shards_dir is not None:
        cmd += ["--shards-dir", str(shards_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    report = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} run failed ({proc.returncode})")
    result = json.loads(report.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def machine() -> str:
    """The CPU by name (the numbers depend on it) and the load it carried when the run started."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
               platform.processor() or "CPU")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{os.cpu_count()}-core {platform.machine()} {cpu}, {mem:.0f} GiB, load average {load} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", type=int, action="append", help="cells to generate (repeatable; default 200000)")
    parser.add_argument("--chunk-size", type=int, default=10_000)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "scfm_bench_qc_align")
    parser.add_argument("--min-cells", type=int, default=3,
                        help="gene filter: keep genes detected in at least this many passing cells (e.g. 5000 to "
                             "make the filter drop genes, so that the streamed QC's second pass runs)")
    parser.add_argument("--skip-scanpy", action="store_true", help="only the streamed run (for very large sizes)")
    parser.add_argument("--keep", action="store_true", help="keep generated and output files")
    parser.add_argument("--shards", action="store_true",
                        help="the scfm run also writes Parquet shards (<workdir>/shards_<cells>, for bench/stream.py)")
    parser.add_argument("--worker", choices=sorted(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--shards-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(RUNS[args.worker](args.input, args.vocab, args.output, args.chunk_size, args.min_cells,
                                           args.shards_dir)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    vocab_path = args.workdir / "vocab.tsv"
    vocabulary(vocab_path)
    rows = []
    for n_cells in args.cells or [200_000]:
        inp = args.workdir / f"synthetic_{n_cells}.h5ad"
        if not inp.exists():
            started = time.perf_counter()
            generate(inp, n_cells)
            print(f"generated {inp} ({inp.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - started:.0f} s",
                  file=sys.stderr)
        results = {}
        for kind in ["scfm"] + ([] if args.skip_scanpy else ["scanpy"]):
            out = args.workdir / f"{kind}_{n_cells}.aligned.h5ad"
            shards = args.workdir / f"shards_{n_cells}" if args.shards and kind == "scfm" else None
            if shards is not None and shards.exists():
                shutil.rmtree(shards)
            results[kind] = measure(kind, inp, vocab_path, out, args.chunk_size, args.min_cells, shards)
            results[kind]["cells_per_s"] = n_cells / results[kind]["seconds"]
            print(f"{n_cells} cells {kind}: {json.dumps(results[kind])}", file=sys.stderr)
            if not args.keep:
                for leftover in args.workdir.glob(f"{kind}_{n_cells}.*"):
                    leftover.unlink()
        if "scanpy" in results and any(results["scanpy"][k] != results["scfm"][k] for k in ("cells_out", "genes_kept")):
            raise SystemExit(f"cells or genes kept differ: {results}")
        rows.append((n_cells, results))
        if not args.keep:
            inp.unlink()

    print(f"\nMachine: {machine()}; chunk size {args.chunk_size}; {N_GENES} genes, ~{NNZ_PER_CELL} nonzero/cell; "
          f"genes kept in >= {args.min_cells} cells\n")
    print("| cells | run | seconds | cells/s | peak RSS (GiB) | speed vs scanpy | RSS vs scanpy |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n_cells, results in rows:
        base = results.get("scanpy")
        for kind, r in results.items():
            speed = f"{r['cells_per_s'] / base['cells_per_s']:.2f}×" if base else "–"
            rss = f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}×" if base else "–"
            print(f"| {n_cells:,} | {kind} | {r['seconds']:.1f} | {r['cells_per_s']:,.0f} | "
                  f"{r['peak_rss_gib']:.2f} | {speed} | {rss} |")


if __name__ == "__main__":
    main()
