"""Streaming pretraining data: does the shard loader keep ahead of the model?

    python bench/qc_align.py --cells 1000000 --skip-scanpy --shards --keep    # writes shards_1000000/
    python bench/stream.py --shards /tmp/scfm_bench_qc_align/shards_1000000 \
        --vocab /tmp/scfm_bench_qc_align/vocab.tsv --steps 200

Two measurements on the same shards, one after the other, each in its own process:

* **loader**: what a training step does before the model sees a batch — ``ShardDataset`` with
  training's settings (loop, row-group mixing, seed) and ``make_batch`` (downsampling, masking,
  collation) with the released objective — for as many micro-batches as the training run takes.
  Reported: seconds to the first batch (the first mixing round is read whole), then cells/s.
* **training**: ``scfm pretrain`` streaming the shards for ``--steps`` steps (one process, ZeRO-2);
  cells/s is the median over steps after ``--warmup``, from ``train_log.jsonl``.

The training loop loads each micro-batch in the process that trains (``num_workers=0``, which keeps
resume exact), so a step's time is loading plus model. The model's own consumption rate is therefore
``1 / (1/training - 1/loader)``: the loader keeps up when its cells/s exceeds that rate, and
``loader share`` = training / loader cells/s is the part of a step spent loading.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def measure_loader(shards: Path, vocab: Path, preset: str, micro_batch_size: int, batches: int, seed: int) -> dict:
    from scfm.data.shards import ShardDataset, read_manifest
    from scfm.data.vocab import Vocabulary
    from scfm.model.config import ModelConfig
    from scfm.train.objective import step_generator
    from scfm.train.pretrain import PretrainSettings, make_batch, next_cells

    defaults = PretrainSettings(shards=[str(shards)], out_dir="unused")
    n_genes = len(Vocabulary.load(vocab))
    config = ModelConfig.preset(preset, n_genes=n_genes)
    started = time.perf_counter()
    stream = iter(ShardDataset([str(shards)], seed=seed, mix_row_groups=defaults.mix_row_groups,
                               row_group_slices=defaults.row_group_slices, loop=True))
    first = None
    tokens = 0
    for step in range(batches):
        cells = next_cells(stream, micro_batch_size)
        batch = make_batch(cells, n_genes, defaults.objective, step_generator(seed, step), config)
        tokens += int(batch.inputs.encoder.n_tokens.sum())
        if first is None:
            first = time.perf_counter()
    done = time.perf_counter()
    steady_cells = (batches - 1) * micro_batch_size
    return {
        "batches": batches,
        "cells": batches * micro_batch_size,
        "first_batch_s": round(first - started, 2),
        "cells_per_s": round(steady_cells / (done - first), 1) if steady_cells else None,
        "encoder_tokens_per_cell": round(tokens / (batches * micro_batch_size), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "cells_in_shards": read_manifest(shards)["n_cells"],
    }


def run_training(args, out: Path) -> dict:
    command = [sys.executable, str(REPO / "bin" / "scfm-pretrain"), "--shards", str(args.shards),
               "--vocab", str(args.vocab), "-o", str(out), "--model-preset", args.preset,
               "--micro-batch-size", str(args.micro_batch_size), "--max-steps", str(args.steps),
               "--save-every", str(args.steps), "--warmup-steps", "10", "--seed", str(args.seed),
               "--precision", args.precision, "--quiet"]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    final = json.loads((out / "metrics.json").read_text())
    speeds = [row["cells_per_s"] for row in log[args.warmup:]] or [row["cells_per_s"] for row in log]
    return {"steps": len(log), "wall_s": round(wall, 1), "cells_per_s": round(statistics.median(speeds), 1),
            "peak_rss_mib": round(final["peak_rss_mib"], 1), "precision": final.get("precision"),
            "first_loss": round(log[0]["loss"], 4), "last_loss": round(log[-1]["loss"], 4)}


def summary(loader: dict, training: dict) -> dict:
    load, train = loader["cells_per_s"], training["cells_per_s"]
    model = 1.0 / (1.0 / train - 1.0 / load) if load > train else float("inf")
    return {"loader_cells_per_s": load, "training_cells_per_s": train,
            "model_consumption_cells_per_s": round(model, 1), "loader_over_model": round(load / model, 2),
            "loader_share_of_step": round(train / load, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True)
    parser.add_argument("--vocab", type=Path, required=True)
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small", "base-100m"])
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the training median")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure_loader(args.shards, args.vocab, args.preset, args.micro_batch_size, args.steps,
                                        args.seed)))
        return
    worker = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], check=True,
                            capture_output=True, text=True)
    loader = json.loads(worker.stdout.strip().splitlines()[-1])
    with tempfile.TemporaryDirectory() as tmp:
        training = run_training(args, Path(tmp) / "run")
    result = {"machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end",
              "preset": args.preset, "micro_batch_size": args.micro_batch_size, "loader": loader,
              "training": training, **summary(loader, training)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
