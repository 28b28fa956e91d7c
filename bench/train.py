"""Pretraining benchmark: cells/s, peak memory and (on a GPU) model FLOPs utilisation.

    .venv/bin/python bench/train.py                                   # tiny, CPU, 1 process, ZeRO-2 fp32
    .venv/bin/python bench/train.py --preset tiny --nproc 2           # tiny, CPU, 2 processes (gloo)
    .venv/bin/python bench/train.py --preset base-100m --genes 19264 --micro-batch-size 8 --steps 30 \
        --peak-tflops 989                                             # one H100: ZeRO-2 bf16, MFU
    .venv/bin/python bench/train.py --mode genes                      # cost against vocabulary size

``--mode genes`` measures how one training step's cost grows with the vocabulary: the tiny and small
presets at 763, 4,000, 8,862 and 19,264 genes, with synthetic cells of PBMC-like sparsity (200-400
nonzero genes) at every size and of realistic sparsity (1,000-3,000 nonzero genes) at 4,000 genes
and up. Every configuration lives in this one process and the configurations take turns, step by
step, for ``--rounds`` rounds, so load from other jobs hits them alike; a fp32 GEMM (1,024-cube) is
timed in every round too, as the peak the steps are measured against. Each step is timed in parts:
building the batch (objective), forward, backward, optimizer. The FLOP estimate per cell counts
what the model must compute: the encoder over the cell's real (unpadded) tokens, every decoder
layer over all ``n_genes + 2`` positions (dense layers, random-feature maps and linear attention),
the decoder input's shared position projection (once per batch) and its per-token corrections;
training = 3 x forward. "of peak" = FLOP estimate x cells/s / the GEMM rate.

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


def forward_flops_per_cell(config, encoder_tokens: float, batch_size: int, decoder_tokens: float) -> float:
    """One cell's forward FLOPs as this implementation computes them (see the module docstring)."""
    encoder = config.encoder_flops_per_token(int(round(encoder_tokens))) * encoder_tokens
    inner, dd, m, e = (config.decoder_heads * config.decoder_head_dim, config.decoder_dim,
                       config.performer_features, config.decoder_head_dim)
    dense = 2 * (3 * dd * inner + inner * dd + 2 * dd * config.decoder_ff_dim)
    attention = 2 * config.decoder_heads * (4 * m * e + m)  # q, k features; context; output; normaliser
    decoder = config.decoder_layers * (dense + attention) * config.n_positions
    decoder_input = 2 * config.encoder_dim * dd * (config.n_positions / batch_size + decoder_tokens)
    return encoder + decoder + decoder_input


def synthetic_cells(n_genes: int, n_cells: int, nnz_range: tuple[int, int], seed: int) -> list[dict]:
    """Shard-like records: ``nnz`` nonzero genes per cell at random positions, NB-like counts."""
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n_cells):
        nnz = int(min(rng.integers(*nnz_range, endpoint=True), n_genes // 2))
        ids = np.sort(rng.choice(n_genes, size=nnz, replace=False)).astype(np.int32)
        counts = (rng.negative_binomial(1, 0.35, size=nnz) + 1).astype(np.float32)
        cells.append({"gene_ids": ids, "counts": counts, "total_counts": float(counts.sum() * 1.05)})
    return cells


def token_counts(batch) -> tuple[int, int]:
    """(encoder tokens, hidden genes) of a batch; also for the dense batches of scfm before 0.x sparse inputs."""
    if hasattr(batch, "inputs"):
        return int((~batch.inputs.encoder.padding_mask).sum()), int(batch.inputs.hidden.shape[0])
    visible = ((batch.values > 0) & ~batch.hidden).sum()  # the dense (cells x genes) layout
    return int(visible) + 2 * len(batch), int(batch.hidden.sum())


class GeneScalingCase:
    """One (preset, vocabulary, sparsity) configuration: model, optimizer, cells, timings."""

    def __init__(self, preset: str, n_genes: int, nnz_range: tuple[int, int], batch_size: int):
        import torch

        from scfm.model.config import ModelConfig
        from scfm.model.xtrimogene import XTrimoGene

        self.preset, self.n_genes, self.nnz_range, self.batch_size = preset, n_genes, nnz_range, batch_size
        self.config = ModelConfig.preset(preset, n_genes=n_genes)
        self.model = XTrimoGene(self.config, seed=0).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.cells = synthetic_cells(n_genes, 4 * batch_size, nnz_range, seed=n_genes)
        self.parts: dict[str, list[float]] = {"batch": [], "forward": [], "backward": [], "optimizer": []}
        self.encoder_tokens: list[float] = []
        self.decoder_tokens: list[float] = []
        self.steps = 0

    def step(self) -> None:
        import torch

        from scfm.train.objective import ObjectiveConfig, make_batch, step_generator
        from scfm.train.pretrain import pretraining_loss

        first = (self.steps % 4) * self.batch_size
        clock = time.perf_counter()
        batch = make_batch(self.cells[first : first + self.batch_size], self.n_genes, ObjectiveConfig(),
                           step_generator(0, self.steps))
        marks = [time.perf_counter()]
        loss = pretraining_loss(self.model, batch, torch.float32, "cpu")
        marks.append(time.perf_counter())
        loss.backward()
        marks.append(time.perf_counter())
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(time.perf_counter())
        for name, start, stop in zip(self.parts, [clock, *marks], marks):
            self.parts[name].append(stop - start)
        real, hidden = token_counts(batch)
        self.encoder_tokens.append(real / self.batch_size)
        self.decoder_tokens.append((real + hidden) / self.batch_size)
        self.steps += 1

    def summary(self, skip: int, gemm_gflops: float) -> dict:
        part = {name: statistics.median(times[skip:]) for name, times in self.parts.items()}
        step = sum(part.values())
        cells_per_s = self.batch_size / step
        flops = 3 * forward_flops_per_cell(self.config, float(np.mean(self.encoder_tokens)), self.batch_size,
                                           float(np.mean(self.decoder_tokens)))
        nnz = float(np.mean([c["gene_ids"].size for c in self.cells]))
        return {
            "preset": self.preset, "n_genes": self.n_genes, "nnz_per_cell": round(nnz),
            "cells_per_s": round(cells_per_s, 2), "ms_per_cell": round(1e3 * step / self.batch_size, 2),
            **{f"{name}_share": round(t / step, 3) for name, t in part.items()},
            "train_gflop_per_cell": round(flops / 1e9, 3),
            "achieved_gflop_s": round(flops * cells_per_s / 1e9, 2),
            "of_gemm_peak": round(flops * cells_per_s / 1e9 / gemm_gflops, 3),
        }


def gemm_gflops(size: int = 1024, repeats: int = 3) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def gene_scaling(args) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    cases = []
    for preset in args.presets.split(","):
        for n_genes in args.gene_sizes:
            cases.append(GeneScalingCase(preset, n_genes, (200, 400), args.micro_batch_size))
            if n_genes >= 4000:
                cases.append(GeneScalingCase(preset, n_genes, (1000, 3000), args.micro_batch_size))
    load_before = os.getloadavg()
    peaks = []
    for round_ in range(args.rounds):
        peaks.append(gemm_gflops())
        for case in cases:
            case.step()
        print(f"round {round_ + 1}/{args.rounds} done (GEMM {peaks[-1]:.0f} GFLOP/s)", file=sys.stderr, flush=True)
    peak = statistics.median(peaks[args.warmup:] or peaks)
    rows = [case.summary(args.warmup, peak) for case in cases]
    for row in rows:  # cost per cell relative to the smallest vocabulary of the same preset and sparsity
        base = min((r for r in rows if r["preset"] == row["preset"] and abs(r["nnz_per_cell"] - row["nnz_per_cell"])
                    < 0.3 * row["nnz_per_cell"]), key=lambda r: r["n_genes"])
        row["time_ratio"] = round(row["ms_per_cell"] / base["ms_per_cell"], 2)
        row["gene_ratio"] = round(row["n_genes"] / base["n_genes"], 2)
    return {"machine": machine(), "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "gemm_gflops_median": round(peak, 1),
            "micro_batch_size": args.micro_batch_size, "rounds": args.rounds, "threads": args.threads, "rows": rows}


def markdown(result: dict) -> str:
    keys = ["preset", "n_genes", "nnz_per_cell", "cells_per_s", "ms_per_cell", "gene_ratio", "time_ratio",
            "batch_share", "forward_share", "backward_share", "optimizer_share", "train_gflop_per_cell",
            "achieved_gflop_s", "of_gemm_peak"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[k]) for k in keys) + " |" for row in result["rows"]]
    return "\n".join(lines)


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
    parser.add_argument("--mode", default="pretrain", choices=["pretrain", "genes"],
                        help="pretrain: one `scfm pretrain` run; genes: step cost against vocabulary size")
    parser.add_argument("--presets", default="tiny,small", help="--mode genes: presets to compare")
    parser.add_argument("--gene-sizes", type=lambda t: [int(x) for x in t.split(",")], default=[763, 4000, 8862, 19264],
                        help="--mode genes: vocabulary sizes")
    parser.add_argument("--rounds", type=int, default=6, help="--mode genes: steps per configuration")
    parser.add_argument("--threads", type=int, default=1,
                        help="--mode genes: torch threads (on a shared machine 2 threads wait on each other)")
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base-100m"])
    parser.add_argument("--genes", type=int, default=765, help="vocabulary width (19264 for base-100m)")
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the cells/s median "
                        "(--mode genes: rounds, default 1)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (GPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.mode == "genes":
        args.warmup = min(args.warmup, 1) if "--warmup" not in sys.argv else args.warmup
        result = gene_scaling(args)
        print(json.dumps(result, indent=2))
        print(markdown(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return

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
