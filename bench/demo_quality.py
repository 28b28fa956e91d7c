"""Why is the demo's scfm embedding weaker than PCA, and which demo settings help?

    python bench/demo_quality.py [--work DIR] [--only NAME ...] [--checkpoint NAME=DIR ...]

Prepares the demo's two samples once (QC → vocab → align, as ``scfm demo`` does), then for each
configuration in ``CONFIGS`` pretrains on sample ``pbmc_a`` only (a separate ``scfm pretrain``
process) and measures, on the demo data:

- **held-out loss**: the pretraining objective (masked MSE, fixed masking draws) on every cell of
  ``pbmc_b``, which the model never saw; next to it the loss of predicting every target gene by its
  mean in ``pbmc_a`` (a model that ignores the cell) — below that line the model uses the cell's context;
- **kNN accuracy** (5-fold, k=15, as in the report) of ``bulk_labels`` on ``pbmc_a``'s embedding, for
  several pools (``all``; its four parts S, T, gene max, gene mean; ``max``; ``all`` standardised per
  dimension) and target depths, next to 50 PCs of log1p(CP10k);
- **Leiden ARI** for the pool the demo uses;
- **collapse**: the share of total variance in the top 5 dimensions, and the mean cosine similarity
  between random pairs of cells;
- **depth response**: ``pbmc_b`` cells thinned to a fifth of their counts, predicted with T = S and with T
  = S + 0.7 (their depth before thinning): the mean prediction at the genes the thinned input lost (a
  depth-aware model raises it when asked for more depth), and the error of the T = S + 0.7 prediction
  against the un-thinned profile next to that of a copy of the thinned input.

``--checkpoint NAME=DIR`` adds an existing checkpoint (e.g. one trained by an earlier scfm) to the
table, measured the same way. Prints one markdown table. Every pretraining run is its own process, so
timings include start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SCFM = str(Path(sys.executable).with_name("scfm"))

# name -> settings: steps, micro batch (mb), lr, warmup (default steps // 10), extra `scfm pretrain` flags,
# optional custom model shape. Steps x micro batch = cells seen. Everything not given is the recipe's default.
CONFIGS: dict[str, dict] = {
    "random init (0 steps)": {"steps": 0},
    "demo now: tiny 800x16 lr2e-3": {"steps": 800, "mb": 16, "lr": 2e-3},
    "tiny 800x16 lr5e-4": {"steps": 800, "mb": 16, "lr": 5e-4},
    "thinning from 200 counts, tiny 800x16 lr5e-4": {"steps": 800, "mb": 16, "lr": 5e-4,
                                                      "flags": ["--downsample-min-total", "200"]},
    "tiny 800x16 lr2e-3 dropout 0": {"steps": 800, "mb": 16, "lr": 2e-3, "flags": ["--encoder-dropout", "0"]},
    "tiny 800x16 lr2e-3 old optimiser/init": {
        "steps": 800, "mb": 16, "lr": 2e-3, "init": "small-normal",
        "flags": ["--weight-decay", "0.01", "--adam-betas", "0.9", "0.95", "--encoder-dropout", "0",
                  "--performer-redraw-interval", "0"]},
    "tiny 150x16 lr2e-3": {"steps": 150, "mb": 16, "lr": 2e-3},
    "wide 128d x2 800x16 lr1e-3": {"steps": 800, "mb": 16, "lr": 1e-3,
                                   "shape": dict(encoder_dim=128, encoder_heads=4, encoder_ff_dim=512)},
}
POOL_VIEWS = ("all", "all z-scored", "S", "T", "gene max", "gene mean", "max")


def run(cmd: list) -> None:
    subprocess.run([str(c) for c in cmd], check=True, stdout=subprocess.DEVNULL)


def prepare(work: Path) -> dict:
    """The demo's inputs, QC, vocabulary and alignment (skipped when already there)."""
    from scfm.demo import SAMPLES, write_demo_inputs

    done = work / "aligned" / "pbmc_b.aligned.h5ad"
    if not done.exists():
        inputs = write_demo_inputs(work / "inputs")
        for sample, batch in SAMPLES.items():
            run([SCFM, "qc", inputs[sample], "-o", work / "qc" / f"{sample}.qc.h5ad", "--sample", sample,
                 "--batch", batch, "--min-genes", 50, "--min-cells", 3, "--quiet"])
        run([SCFM, "vocab", "build", *[work / "qc" / f"{s}.qc.h5ad" for s in SAMPLES], "-o", work / "vocab.tsv",
             "--min-cells", 3, "--quiet"])
        for sample in SAMPLES:
            run([SCFM, "align", work / "qc" / f"{sample}.qc.h5ad", "-o", work / "aligned" / f"{sample}.aligned.h5ad",
                 "--vocab", work / "vocab.tsv", "--shards-dir", work / "shards" / sample, "--quiet"])
    return {s: work / "aligned" / f"{s}.aligned.h5ad" for s in SAMPLES}


def shard_records(shard_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    records = []
    for path in sorted(shard_dir.glob("*.parquet")):
        table = pq.read_table(path, columns=["gene_ids", "counts", "total_counts"])
        for row in table.to_pylist():
            records.append({"gene_ids": np.asarray(row["gene_ids"]), "counts": np.asarray(row["counts"], np.float32),
                            "total_counts": row["total_counts"]})
    return records


def pretrain(work: Path, name: str, spec: dict) -> tuple[Path, float]:
    """A checkpoint for ``spec`` (random weights for 0 steps) and the seconds it took."""
    import torch

    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    out = work / "runs" / "".join(c if c.isalnum() or c in ".-" else "_" for c in name)
    vocab = Vocabulary.load(work / "vocab.tsv")
    config = ModelConfig.preset("tiny", n_genes=len(vocab)).replace(**spec.get("shape", {}))
    init = out / "init"
    torch.manual_seed(0)
    save_checkpoint(init, XTrimoGene(config, seed=0, init=spec.get("init", "pytorch")), config, vocab)
    if spec["steps"] == 0:
        return init, 0.0
    began = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([SCFM, "pretrain", "--shards", str(work / "shards" / "pbmc_a"), "-o", str(out / "pretrain"),
                    "--init-checkpoint", str(init), "--max-steps", str(spec["steps"]),
                    "--micro-batch-size", str(spec["mb"]), "--lr", str(spec["lr"]),
                    "--warmup-steps", str(spec.get("warmup", max(1, spec["steps"] // 10))),
                    "--save-every", str(spec["steps"]), *spec.get("flags", []),
                    "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}", "--quiet"],
                   check=True, env=env, stdout=subprocess.DEVNULL)
    return out / "pretrain" / "model", time.perf_counter() - began


def held_out_loss(model, records: list[dict], mean_profile: np.ndarray | None = None) -> float:
    """Masked MSE on ``records`` with fixed draws; with ``mean_profile`` that vector is the prediction."""
    import torch

    from scfm.train.objective import ObjectiveConfig, make_batch, masked_mse
    from scfm.train.pretrain import pretraining_loss

    rng = np.random.default_rng(12345)
    n_genes = model.config.n_genes
    total, weight = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(records), 32):
            batch = make_batch(records[start : start + 32], n_genes, ObjectiveConfig(), rng, model.config)
            n = float(batch.targets.numel())
            if mean_profile is None:
                loss = pretraining_loss(model, batch, torch.float32, "cpu")
            else:
                loss = masked_mse(torch.from_numpy(mean_profile[batch.positions[:, 1].numpy()]), batch.targets)
            total, weight = total + float(loss) * n, weight + n
    return total / weight


def mean_target_profile(records: list[dict], n_genes: int) -> np.ndarray:
    """Each gene's mean normalised expression (log1p of counts per 10k) over ``records``, un-thinned."""
    profile = np.zeros(n_genes, dtype=np.float64)
    for cell in records:
        total = max(float(cell["total_counts"]), float(cell["counts"].sum()), 1.0)
        profile[cell["gene_ids"]] += np.log1p(cell["counts"] / total * 1e4)
    return (profile / len(records)).astype(np.float32)


def depth_response(model, records: list[dict], keep: float = 0.2) -> dict:
    """Predictions for thinned cells at T = S and T = S + log10(1/keep); see the module docstring."""
    import scipy.sparse as sp
    import torch

    from scfm.model import inputs as I

    n_genes = model.config.n_genes
    rng = np.random.default_rng(9)
    full = np.zeros((len(records), n_genes), np.float32)
    original = np.zeros_like(full)
    for row, cell in enumerate(records):
        full[row, cell["gene_ids"]] = cell["counts"]
        total = max(float(cell["total_counts"]), float(cell["counts"].sum()))
        original[row, cell["gene_ids"]] = np.log1p(cell["counts"] / total * 1e4)
    counts = rng.binomial(np.rint(full).astype(np.int64), keep).astype(np.float32)
    nonempty = counts.sum(axis=1) > 0
    thinned, reference = sp.csr_matrix(counts[nonempty]), original[nonempty]
    norm, totals = I.normalize_counts(thinned)
    missed = norm.toarray() == 0
    out = {}
    with torch.no_grad():
        for added in (0.0, float(np.log10(1 / keep))):
            target, source = I.depth_tokens(totals, f"a{added:.4f}")
            pred = model(I.decoder_batch_from_csr(norm, target, source, model.config))[:, :n_genes].numpy()
            out[added] = pred
    deeper = out[float(np.log10(1 / keep))]
    return {"missed_at_S": round(float(out[0.0][missed].mean()), 3), "missed_at_T": round(float(deeper[missed].mean()), 3),
            "mse_restored": round(float(np.mean((deeper - reference) ** 2)), 3),
            "mse_copy": round(float(np.mean((norm.toarray() - reference) ** 2)), 3)}


def pool_views(model, counts, target_depth: str) -> dict[str, np.ndarray]:
    from scfm.tasks.embed import embed_cells

    everything = embed_cells(model, counts, pool="all", target_depth=target_depth, device="cpu")
    d = model.config.encoder_dim
    z = (everything - everything.mean(0)) / (everything.std(0) + 1e-6)
    return {"all": everything, "all z-scored": z, "S": everything[:, :d], "T": everything[:, d : 2 * d],
            "gene max": everything[:, 2 * d : 3 * d], "gene mean": everything[:, 3 * d :],
            "max": embed_cells(model, counts, pool="max", target_depth=target_depth, device="cpu")}


def collapse(embedding: np.ndarray) -> tuple[float, float]:
    variances = np.sort(embedding.var(axis=0))[::-1]
    top5 = float(variances[:5].sum() / max(variances.sum(), 1e-12))
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(embedding), 500), rng.integers(0, len(embedding), 500)
    x, y = embedding[a], embedding[b]
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1) + 1e-12)
    return top5, float(cosine[a != b].mean())


def ari(embedding: np.ndarray, labels: np.ndarray) -> float:
    import anndata as ad
    from sklearn.metrics import adjusted_rand_score

    from scfm.report.metrics import leiden_clusters

    adata = ad.AnnData(X=np.zeros((len(labels), 1), np.float32))
    adata.obsm["e"] = embedding
    return float(adjusted_rand_score(labels, leiden_clusters(adata, "e", seed=0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/scfm_demo_quality"))
    parser.add_argument("--only", action="append", help="run only configurations whose name contains this")
    parser.add_argument("--depths", default="t4,a0", help="target depths to embed with (comma-separated)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=DIR",
                        help="also measure an existing checkpoint")
    args = parser.parse_args()

    import anndata as ad
    import torch

    from scfm.model.checkpoint import load_checkpoint
    from scfm.report.html import PCA_KEY, add_pca_baseline
    from scfm.report.metrics import knn_accuracy

    torch.set_num_threads(2)
    aligned = prepare(args.work)
    train = ad.read_h5ad(aligned["pbmc_a"])
    labels = train.obs["bulk_labels"].astype(str).to_numpy()
    add_pca_baseline(train, seed=0)
    pca = train.obsm[PCA_KEY]
    print(f"PCA 50: kNN {knn_accuracy(pca, labels):.3f}  ARI {ari(pca, labels):.3f}  "
          f"top-5 variance share {collapse(pca)[0]:.2f}  mean cosine {collapse(pca)[1]:.2f}", flush=True)
    held_out = shard_records(args.work / "shards" / "pbmc_b")
    train_records = shard_records(args.work / "shards" / "pbmc_a")

    rows = []
    depths = args.depths.split(",")
    given = [(text.split("=", 1)[0], {"checkpoint": Path(text.split("=", 1)[1])}) for text in args.checkpoint]
    for name, spec in [*CONFIGS.items(), *given]:
        if args.only and not any(o in name for o in args.only) and "checkpoint" not in spec:
            continue
        checkpoint, seconds = (spec["checkpoint"], 0.0) if "checkpoint" in spec else pretrain(args.work, name, spec)
        model = load_checkpoint(checkpoint).model.float().eval()
        if not rows:
            mean_loss = held_out_loss(model, held_out, mean_target_profile(train_records, model.config.n_genes))
            print(f"held-out loss of the per-gene mean predictor: {mean_loss:.4f}", flush=True)
        loss = held_out_loss(model, held_out)
        row = {"config": name, "pretrain_s": round(seconds, 1), "held_out_loss": round(loss, 4),
               **depth_response(model, held_out)}
        for depth in depths:
            views = pool_views(model, train.X, depth)
            for view in POOL_VIEWS:
                row[f"knn {view} {depth}"] = round(knn_accuracy(views[view], labels), 3)
            row[f"ari all {depth}"] = round(ari(views["all"], labels), 3)
            row[f"ari all z-scored {depth}"] = round(ari(views["all z-scored"], labels), 3)
            top5, cosine = collapse(views["all"])
            row[f"top5 var {depth}"], row[f"cosine {depth}"] = round(top5, 2), round(cosine, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)

    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
