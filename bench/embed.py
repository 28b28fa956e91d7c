"""Embedding benchmark: cells/s, peak memory, FLOPs per cell and fraction of what the hardware can do.

    .venv/bin/python bench/embed.py --json /tmp/embed_bench.json            # everything (~15 min on 2 cores)
    .venv/bin/python bench/embed.py --sections gemm,throughput --base-cells 50
    python bench/embed.py --device cuda --sections gemm,throughput --tiny-cells 20000 --base-cells 20000

Sections
- gemm:       measured fp32 and bf16 matmul peak (GFLOP/s) at a large square shape and at the encoder's
              own shapes (tokens of a batch x 768 -> 3072 and back), the yardstick for every other figure.
- throughput: ``tiny`` and ``base-100m`` cell embeddings (pool all) with length bucketing in fp32 and
              bf16, and a per-cell baseline of our own model (batch size 1, no bucketing), with the
              per-cell cosine of bf16 to fp32. Encoder FLOPs are counted from the token lengths; the
              token-length distribution of the data is reported with them. Each figure is also given as
              a fraction of the measured GEMM peak, and ``ceiling_cells_per_s`` is what the GEMM peak
              alone would allow (FLOPs per cell / peak): no implementation of this model can beat it.
              On CUDA, MFU = model FLOP/s / the device's nominal dense peak (``--peak-tflops``; known for
              H100 and H200), and peak memory is ``torch.cuda.max_memory_allocated``.
- file:       ``scfm embed`` (the command users run, in its own process) on an aligned ``.h5ad`` you give
              (``--input``, with its vocabulary ``--input-vocab``), e.g. the million cells that
              ``bench/qc_align.py --cells 1000000 --keep`` leaves: wall time, cells/s, peak RSS (wait4 on
              the child), tokens per cell, the precision ``auto`` chose. Weights: random, ``--file-preset``.
- memory:     peak RSS embedding 10k vs 100k cells, streamed from an .h5ad on disk into a memmap, to
              show memory is flat in the number of cells. The model is ``micro`` (``tiny`` with one
              32-d encoder layer) so that 100k cells fit in a few minutes on 2 cores; the model's
              size does not change how memory scales with the number of cells.

Data: real PBMC counts (scfm.data.demo_data, ~250 nonzero genes per cell) placed at fixed random
columns of a 19,264-gene vocabulary, tiled to the number of cells needed. Weights are random (the
official-layout initialisation), so speed is meaningful and bf16-vs-fp32 agreement is indicative.
Each configuration runs in a fresh subprocess so that its peak memory is its own. The batch size
defaults to what ``scfm embed`` uses on the device (4 cells on a CPU, 64 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_GENES = 19264
REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- data
def pbmc_in_vocabulary(n_cells: int, seed: int = 0):
    import scipy.sparse as sp

    from scfm.data.demo_data import pbmc68k_counts

    counts = pbmc68k_counts().X.tocsr()
    columns = np.random.default_rng(seed).choice(N_GENES, size=counts.shape[1], replace=False)
    placed = sp.csr_matrix((counts.data, columns[counts.indices], counts.indptr), shape=(counts.shape[0], N_GENES))
    placed.sort_indices()
    reps = -(-n_cells // placed.shape[0])
    return sp.vstack([placed] * reps, format="csr")[:n_cells]


def encoder_flops(config, counts) -> np.ndarray:
    lengths = np.diff(counts.indptr) + 2
    return np.array([config.encoder_flops_per_token(int(n)) * n for n in lengths])


# ------------------------------------------------------------------------------------------- gemm
# nominal dense bf16 tensor-core peaks (TFLOP/s), the usual denominator of MFU
NOMINAL_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def gemm_gflops(dtype_name: str, m: int, k: int, n: int, device: str = "cpu", repeats: int = 8) -> float:
    """Best-of-``repeats`` throughput of x (m, k) @ W.T for W (n, k), as ``nn.Linear`` computes it."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    x = torch.randn(m, k, device=device).to(dtype)
    w = torch.randn(n, k, device=device).to(dtype)
    for _ in range(3):
        torch.nn.functional.linear(x, w)
    _synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


def gemm_section(device: str, batch_size: int, mean_tokens: float) -> dict:
    """Peak at a large square shape, and at the shapes the base-100m encoder multiplies."""
    size = 8192 if device == "cuda" else 2048
    tokens = int(batch_size * mean_tokens)
    shapes = {f"square {size}": (size, size, size),
              f"encoder ff in ({tokens} tokens x 768 -> 3072)": (tokens, 768, 3072),
              f"encoder ff out ({tokens} tokens x 3072 -> 768)": (tokens, 3072, 768),
              f"encoder qkv ({tokens} tokens x 768 -> 2304)": (tokens, 768, 2304)}
    table = {name: {d: gemm_gflops(d, *shape, device=device) for d in ("fp32", "bf16")}
             for name, shape in shapes.items()}
    peak = {d: max(row[d] for row in table.values()) for d in ("fp32", "bf16")}
    return {"shapes": table, "peak": peak, "bf16_over_fp32": peak["bf16"] / peak["fp32"]}


# ------------------------------------------------------------------------------------------ workers
def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_throughput(args) -> dict:
    import torch

    from scfm.model.checkpoint import load_checkpoint
    from scfm.tasks.embed import embed_cells

    loaded = load_checkpoint(args.checkpoint, version="ce", vocab=args.vocab)
    counts = pbmc_in_vocabulary(args.cells)
    per_cell = args.mode == "per-cell"
    settings = dict(precision=args.precision, device=args.device, batch_size=1 if per_cell else args.batch_size,
                    chunk_size=1 if per_cell else 4096)
    # warm-up (allocator, kernels, autocast weight cache) so that the timing is steady state
    embed_cells(loaded.model, counts[: max(4, args.batch_size)], **settings)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    emb = embed_cells(loaded.model, counts, **settings)  # returns host arrays: the device is done
    seconds = time.perf_counter() - start
    np.save(args.save, emb)
    flops = encoder_flops(loaded.config, counts)
    tokens = np.diff(counts.indptr) + 2
    result = {"seconds": seconds, "cells_per_s": args.cells / seconds, "flops_per_cell": float(flops.mean()),
              "gflops_per_s": float(flops.sum() / seconds / 1e9), "peak_rss_mib": _peak_rss_mib(),
              "threads": torch.get_num_threads(), "device": args.device,
              "tokens_per_cell": {"mean": float(tokens.mean()), "p10": float(np.percentile(tokens, 10)),
                                  "median": float(np.median(tokens)), "p90": float(np.percentile(tokens, 90))}}
    if args.device == "cuda":
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def worker_memory(args) -> dict:
    import h5py

    from scfm.model.checkpoint import load_checkpoint
    from scfm.tasks.embed import H5adRows, embed_cells

    loaded = load_checkpoint(args.checkpoint, version="ce", vocab=args.vocab)
    out = np.lib.format.open_memmap(args.save, mode="w+", dtype=np.float32,
                                    shape=(args.cells, 4 * loaded.config.encoder_dim))
    # the output goes to disk, the input streams from disk: nothing here grows with the number of cells
    start = time.perf_counter()
    with h5py.File(args.h5ad, "r") as handle:
        rows = H5adRows(handle["X"], args.h5ad)
        assert rows.shape[0] >= args.cells

        class FirstRows:  # the first N cells of the file, still read block by block
            shape = (args.cells, rows.shape[1])

            def __getitem__(self, s):
                return rows[s]

        embed_cells(loaded.model, FirstRows(), batch_size=args.batch_size, device=args.device, chunk_size=4096,
                    out=out)
    seconds = time.perf_counter() - start
    out.flush()
    return {"seconds": seconds, "cells_per_s": args.cells / seconds, "peak_rss_mib": _peak_rss_mib()}


def run_worker(kind: str, **kwargs) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind]
    for key, value in kwargs.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SCFM_PROGRESS": "0"})
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------- main
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="gemm,throughput,memory")
    parser.add_argument("--tiny-cells", type=int, default=2000)
    parser.add_argument("--base-cells", type=int, default=200)
    parser.add_argument("--memory-cells", default="10000,100000")
    parser.add_argument("--per-cell-max", type=int, default=500,
                        help="cells for the one-at-a-time baseline (the first N of the same data)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, help="cells per batch (default: scfm embed's for the device)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's nominal dense bf16 peak, for MFU (default: known for H100/H200/A100)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument("--input", type=Path, help="file section: an aligned .h5ad to embed with scfm embed")
    parser.add_argument("--input-vocab", type=Path, help="file section: the vocabulary --input is aligned to")
    parser.add_argument("--file-preset", default="tiny", choices=["tiny", "small", "base-100m"])
    parser.add_argument("--file-precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--worker", choices=["throughput", "memory"], help=argparse.SUPPRESS)
    for hidden in ("checkpoint", "vocab", "precision", "mode", "save", "h5ad"):
        parser.add_argument(f"--{hidden}", help=argparse.SUPPRESS)
    parser.add_argument("--cells", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = worker_throughput(args) if args.worker == "throughput" else worker_memory(args)
        print(json.dumps(result))
        return

    import torch

    from scfm.data.vocab import Vocabulary
    from scfm.model import ModelConfig
    from scfm.model.checkpoint import write_official_style_checkpoint
    from scfm.tasks.embed import default_batch_size, resolve_device

    device = resolve_device(args.device).type
    batch_size = args.batch_size or default_batch_size("cell", device)
    peak_tflops = args.peak_tflops or (_nominal_tflops() if device == "cuda" else None)
    sections = set(args.sections.split(","))
    results: dict = {"machine": _machine(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "device": device, "batch_size": batch_size, "nominal_bf16_tflops": peak_tflops}
    with tempfile.TemporaryDirectory(prefix="scfm-embed-bench-") as scratch:
        scratch = Path(scratch)
        vocab_path = scratch / "vocab.tsv"
        Vocabulary([f"G{i}" for i in range(N_GENES)]).save(vocab_path)
        checkpoints = {}

        def checkpoint(preset):
            if preset not in checkpoints:
                if preset == "micro":
                    config = ModelConfig.preset("tiny", n_genes=N_GENES).replace(
                        encoder_dim=32, encoder_layers=1, encoder_heads=2, encoder_ff_dim=64)
                else:
                    config = ModelConfig.preset(preset, n_genes=N_GENES)
                checkpoints[preset] = write_official_style_checkpoint(
                    scratch / f"{preset}.ckpt", config, seed=0, versions=("cell",))
            return checkpoints[preset]

        if "gemm" in sections:
            mean_tokens = float(np.diff(pbmc_in_vocabulary(700).indptr).mean()) + 2
            results["gemm"] = gemm_section(device, batch_size, mean_tokens)
            print("gemm", json.dumps(results["gemm"]), flush=True)

        if "throughput" in sections:
            results["throughput"] = []
            for preset, n in (("tiny", args.tiny_cells), ("base-100m", args.base_cells)):
                saved = {}
                for mode, precision in (("bucketed", "fp32"), ("bucketed", "bf16"), ("per-cell", "fp32")):
                    save = scratch / f"{preset}-{mode}-{precision}.npy"
                    cells = min(n, args.per_cell_max) if mode == "per-cell" else n
                    r = run_worker("throughput", checkpoint=checkpoint(preset), vocab=vocab_path, cells=cells,
                                   precision=precision, mode=mode, save=save, batch_size=batch_size, device=device)
                    r.update(preset=preset, mode=mode, precision=precision, cells=cells)
                    saved[(mode, precision)] = np.load(save)
                    r.update(hardware_fractions(r, results.get("gemm"), peak_tflops))
                    results["throughput"].append(r)
                    print(json.dumps(r), flush=True)
                cos = cosine_rows(saved[("bucketed", "fp32")], saved[("bucketed", "bf16")])
                per_cell = saved[("per-cell", "fp32")]
                same = np.abs(saved[("bucketed", "fp32")][: len(per_cell)] - per_cell).max()
                results.setdefault("agreement", {})[preset] = {
                    "bf16_vs_fp32_cosine_min": float(cos.min()), "bf16_vs_fp32_cosine_mean": float(cos.mean()),
                    "bucketed_vs_per_cell_fp32_max_abs_diff": float(same)}
                print(preset, results["agreement"][preset], flush=True)

        if "memory" in sections:
            import anndata as ad

            sizes = [int(s) for s in args.memory_cells.split(",")]
            h5ad = scratch / "cells.h5ad"
            ad.AnnData(X=pbmc_in_vocabulary(max(sizes)).astype(np.float32)).write_h5ad(h5ad)
            results["memory"] = []
            for n in sizes:
                r = run_worker("memory", checkpoint=checkpoint("micro"), vocab=vocab_path, cells=n, h5ad=h5ad,
                               save=scratch / f"mem-{n}.npy", batch_size=batch_size, device=device)
                r.update(preset="micro", cells=n)
                results["memory"].append(r)
                print(json.dumps(r), flush=True)
            results["memory_note"] = ("a dense float64 cells x 19,264 table, as the released script builds, would "
                                      f"need {max(sizes) * N_GENES * 8 / 2**30:.1f} GiB for {max(sizes)} cells")

        if "file" in sections:
            results["file"] = embed_file_section(args, scratch)
            print(json.dumps(results["file"]), flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def embed_file_section(args, scratch: Path) -> dict:
    """``scfm embed`` on ``args.input`` in a child process; its progress bar goes to this process's stderr."""
    import h5py
    from anndata.io import read_elem

    from scfm.data.vocab import Vocabulary
    from scfm.model import ModelConfig
    from scfm.model.checkpoint import write_official_style_checkpoint

    if args.input is None or args.input_vocab is None:
        raise SystemExit("--sections file needs --input and --input-vocab")
    config = ModelConfig.preset(args.file_preset, n_genes=len(Vocabulary.load(args.input_vocab)))
    checkpoint = write_official_style_checkpoint(scratch / "file-model.ckpt", config, seed=0, versions=("cell",))
    out = scratch / "embedded.h5ad"
    with h5py.File(args.input, "r") as handle:
        indptr = handle["X/indptr"][:]
    tokens = np.diff(indptr) + 2
    cmd = [sys.executable, str(REPO / "bin" / "scfm-embed"), str(args.input), "-o", str(out),
           "--checkpoint", str(checkpoint), "--vocab", str(args.input_vocab), "--precision", args.file_precision,
           "--mlflow-uri", f"sqlite:///{scratch / 'mlflow.db'}"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"scfm embed failed ({os.waitstatus_to_exitcode(status)})")
    with h5py.File(out, "r") as handle:
        settings = read_elem(handle["uns/scfm/embed"]) if "uns/scfm/embed" in handle else {}
        shape = handle["obsm/X_scfm"].shape
    return {"input": str(args.input), "preset": args.file_preset, "cells": int(len(tokens)), "output_shape": list(shape),
            "seconds": seconds, "cells_per_s": len(tokens) / seconds, "peak_rss_mib": usage.ru_maxrss / 1024,
            "input_gib": args.input.stat().st_size / 2**30, "output_gib": out.stat().st_size / 2**30,
            "tokens_per_cell": {"mean": float(tokens.mean()), "median": float(np.median(tokens))},
            "precision": str(settings.get("precision")), "precision_reason": str(settings.get("precision_reason"))}


def hardware_fractions(result: dict, gemm: dict | None, peak_tflops: float | None) -> dict:
    """The throughput as a fraction of the measured GEMM peak, the cells/s that peak allows, and MFU."""
    fractions = {}
    if gemm is not None:
        peak = gemm["peak"][result["precision"]]
        fractions["fraction_of_gemm_peak"] = result["gflops_per_s"] / peak
        fractions["ceiling_cells_per_s"] = peak * 1e9 / result["flops_per_cell"]
    if peak_tflops and result["device"] == "cuda":
        fractions["mfu"] = result["gflops_per_s"] / (peak_tflops * 1e3)
    return fractions


def _nominal_tflops() -> float | None:
    import torch

    name = torch.cuda.get_device_name(0)
    for key, tflops in NOMINAL_BF16_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops
    return None


def _machine(device: str = "cpu") -> str:
    import platform

    if device == "cuda":
        import torch

        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}), host {os.cpu_count()} cores"
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    cpu = fields.get("model name", platform.processor() or "CPU")
    if "cpu family" in fields:
        cpu += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-core {platform.machine()} {cpu}{' with AVX-512 BF16' if 'avx512_bf16' in info else ''}, "
            f"{mem:.0f} GiB")


if __name__ == "__main__":
    main()
