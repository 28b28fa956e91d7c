"""Pretraining benchmark: cells/s, peak memory and (on a GPU) model FLOPs utilisation.

    .venv/bin/python bench/train.py                                   # tiny, CPU, 1 process, ZeRO-2 fp32
    .venv/bin/python bench/train.py --preset tiny --nproc 2           # tiny, CPU, 2 processes (gloo)
    .venv/bin/python bench/train.py --preset base-100m --genes 19264 --micro-batch-size 8 --steps 30 \
        --peak-tflops 989                                             # one H100: ZeRO-2 bf16, MFU

Each configuration runs ``scfm pretrain`` in a subprocess (under ``torch.distributed.run`` when
``--nproc`` > 1) and reads its ``train_log.jsonl``: cells/s is the median over steps after the first
``--warmup`` steps (start-up, allocator warm-up), wall time includes everything. Peak memory is
rank 0's peak resident set and, on CUDA, its ``torch.cuda.max_memory_allocated`` (both reported
by ``scfm pretrain`` in ``metrics.json``).

Data: the 700 real PBMCs (scfm.data.demo_data). With ``--genes N`` > 765 their 765 genes are placed
at fixed random columns of an N-gene vocabulary (``base-100m`` needs 19,264), which keeps real
sparsity (~250 nonzero genes per cell) at the model's real width.

MFU (GPU only): model FLOPs per cell are counted from the shapes, x3 for forward + backward:
encoder ``ModelConfig.encoder_flops_per_token(L) * L`` over the L = nonzero + 2 encoder tokens, and
the decoder's dense layers over all ``n_genes + 2`` positions (2 FLOPs per weight per position; the
Performer's linear attention adds ``4 * features * head_dim * heads`` per position per layer). MFU =
FLOPs per cell x cells/s / peak (``--peak-tflops``, e.g. 989 for an H100's dense bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_shards(root: Path, n_genes: int, seed: int = 0) -> tuple[Path, Path, float]:
    """PBMC shards over an ``n_genes`` vocabulary; returns (shards, vocab TSV, mean nonzero genes)."""
    import scipy.sparse as sp

    from scfm.data.demo_data import pbmc68k_counts
    from scfm.data.shards import ShardWriter
    from scfm.data.vocab import Vocabulary

    adata = pbmc68k_counts()
    counts = adata.X.tocsr()
    genes = list(adata.var_names)
    if n_genes > len(genes):
        rng = np.random.default_rng(seed)
        columns = np.sort(rng.choice(n_genes, size=len(genes), replace=False))
        filler = iter(f"BENCH{i:05d}" for i in range(n_genes))
        names = [next(filler) for _ in range(n_genes)]
        for column, gene in zip(columns, genes):
            names[column] = gene
        counts = sp.csr_matrix((counts.data, columns[counts.indices], counts.indptr), shape=(counts.shape[0], n_genes))
        genes = names
    vocab = Vocabulary(genes)
    vocab.save(root / "vocab.tsv")
    with ShardWriter(root / "shards", vocab, (), cells_per_shard=350, row_group_size=25) as writer:
        writer.write(list(adata.obs_names), counts)
    return root / "shards", root / "vocab.tsv", float(np.diff(counts.indptr).mean())


def training_flops_per_cell(config, encoder_tokens: float) -> float:
    """Forward + backward model FLOPs for one cell (see the module docstring)."""
    length = encoder_tokens
    encoder = config.encoder_flops_per_token(int(round(length))) * length
    inner = config.decoder_heads * config.decoder_head_dim
    dd = config.decoder_dim
    dense_weights = 3 * dd * inner + inner * dd + 2 * dd * config.decoder_ff_dim
    attention = 4 * config.performer_features * config.decoder_head_dim * config.decoder_heads
    decoder = config.decoder_layers * (2 * dense_weights + attention) * config.n_positions
    embed_and_head = 2 * (config.encoder_dim * config.decoder_dim + config.decoder_dim) * config.n_positions
    return 3.0 * (encoder + decoder + embed_and_head)


def run_pretrain(args, shards: Path, vocab: Path, out: Path) -> float:
    scfm = [str(REPO / "bin" / "scfm-pretrain")]
    if args.nproc > 1:
        scfm = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc),
                *scfm]
    else:
        scfm = [sys.executable, *scfm]
    command = [*scfm, "--shards", str(shards), "--vocab", str(vocab), "-o", str(out),
               "--model-preset", args.preset, "--zero-stage", str(args.zero_stage),
               "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.steps),
               "--save-every", str(args.steps), "--warmup-steps", "2", "--lr", "1e-4", "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - started


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base-100m"])
    parser.add_argument("--genes", type=int, default=765, help="vocabulary width (19264 for base-100m)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the cells/s median")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from scfm.model.config import ModelConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, vocab, nnz = write_shards(root, args.genes)
        wall = run_pretrain(args, shards, vocab, root / "out")
        log = [json.loads(line) for line in (root / "out" / "train_log.jsonl").read_text().splitlines()]
        final = json.loads((root / "out" / "metrics.json").read_text())
    speeds = [r["cells_per_s"] for r in log[args.warmup:]] or [r["cells_per_s"] for r in log]
    cells_per_s = statistics.median(speeds)
    config = ModelConfig.preset(args.preset, n_genes=args.genes)
    flops = training_flops_per_cell(config, nnz + 2)
    result = {
        "machine": machine(),
        "preset": args.preset,
        "n_parameters": config.n_parameters(),
        "n_genes": args.genes,
        "processes": args.nproc,
        "zero_stage": args.zero_stage,
        "micro_batch_size": args.micro_batch_size,
        "steps": args.steps,
        "cells_per_s_median": round(cells_per_s, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mib_rank0": round(final["peak_rss_mib"], 1),
        "peak_cuda_mib_rank0": round(final["peak_cuda_mib"], 1) if "peak_cuda_mib" in final else None,
        "train_gflop_per_cell": round(flops / 1e9, 3),
        "achieved_gflop_s": round(flops * cells_per_s / 1e9, 2),
        "first_loss": log[0]["loss"],
        "last_loss": log[-1]["loss"],
    }
    if args.peak_tflops:
        result["mfu"] = round(flops * cells_per_s / (args.peak_tflops * 1e12), 4)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
