"""Perturbation response on real Perturb-seq: scfm perturb vs its ablations and baselines.

    python bench/perturb.py [--work DIR] [--seeds 0 1 2] [--pretrain-steps 400]
    python bench/perturb.py --checkpoint models.ckpt --vocab OS_scRNA_gene_index.19264.tsv   # released weights

Data: ``../shared/data/papalexi2021_thp1_eccite_lowmoi.rda`` (Papalexi et al. 2021, ECCITE-seq CRISPR
knockouts in THP-1 cells: 20,729 cells, 299 measured genes, 26 target genes, non-targeting controls).

1. Cells are labelled by guide with ``scfm perturb assign`` (top guide >= 5 UMIs and >= 2x the second).
2. Vocabulary: the 299 measured genes plus the target genes that are not among them (17 of 26). Those
   are never measured, so the model sees them as unexpressed: they are "in the vocabulary", which the
   predictor needs to embed a perturbation, but what the small model knows of them is only what it
   learned from their always-zero positions (see bench/RESULTS.md).
3. A ``tiny`` scfm model is pretrained once with ``scfm pretrain`` on the non-targeting control cells only:
   no perturbed cell, held out or not, is seen in pretraining (controls are in every fold's training set).
   The seeds vary the folds and the predictor, not the pretrained model.
   With ``--checkpoint`` the given model is used instead (aligned to its vocabulary, no pretraining).
4. ``scfm perturb train --folds 5`` (held-out target genes) for gene features ``scfm``, ``random`` and
   ``learned`` (the ablations), each evaluated next to the baselines (no change, training mean, linear).
   Gene graph: co-expression of control cells; perturbation graph: DoRothEA TF -> target regulons
   (confidence A-C, ``../shared/data/dorothea_hs.rda``) joined with co-expression.

Prints markdown tables (mean over held-out perturbations, then over seeds) and writes
``<work>/perturb_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
PAPALEXI = "papalexi2021_thp1_eccite_lowmoi.rda"
DOROTHEA = "dorothea_hs.rda"
CONTROL = "non-targeting"
KEY = "target"
SCFM = str(Path(sys.executable).with_name("scfm"))


def shared_data() -> Path:
    """``shared/data`` next to the project (``../shared/data`` from a checkout; worktrees sit deeper)."""
    for base in (REPO.parent, REPO.parent.parent, Path("/work")):
        if (base / "shared" / "data" / PAPALEXI).exists():
            return base / "shared" / "data"
    return REPO.parent / "shared" / "data"


def _triplet(matrix) -> sp.csr_matrix:
    """An R dgTMatrix (slots i, j, x, Dim) as scipy CSR."""
    shape = tuple(int(d) for d in np.asarray(matrix.Dim))
    return sp.coo_matrix((np.asarray(matrix.x, dtype=np.float32), (np.asarray(matrix.i), np.asarray(matrix.j))),
                         shape=shape).tocsr()


def load_papalexi(path: Path):
    """(cells AnnData with raw counts, guide counts AnnData, guide -> target DataFrame) from the .rda."""
    import anndata as ad
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that it has no class for dgTMatrix; its slots are enough
        data = rdata.read_rda(str(path))["lowmoi_example_data"]
    genes = [str(g) for g in data["response_matrix"].Dimnames[0]]
    guides = [str(g) for g in data["grna_matrix"].Dimnames[0]]
    counts = _triplet(data["response_matrix"]).T.tocsr()          # cells x genes
    guide_counts = _triplet(data["grna_matrix"]).T.tocsr()        # cells x guides
    cell_ids = [f"cell{i:05d}" for i in range(counts.shape[0])]
    obs = pd.DataFrame({"bio_rep": data["extra_covariates"]["bio_rep"].astype(str).to_numpy()}, index=cell_ids)
    cells = ad.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=genes))
    guide_matrix = ad.AnnData(X=guide_counts, obs=pd.DataFrame(index=cell_ids), var=pd.DataFrame(index=guides))
    table = data["grna_target_data_frame"].rename(columns={"grna_id": "guide", "grna_target": "target"})
    return cells, guide_matrix, table[["guide", "target"]].astype(str)


def dorothea_edges(path: Path, confidence: str = "ABC") -> pd.DataFrame:
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata reads the tibble as a plain data.frame, and says so
        frame = rdata.read_rda(str(path))["dorothea_hs"]
    frame = frame[frame["confidence"].astype(str).isin(list(confidence))]
    return pd.DataFrame({"source": frame["tf"].astype(str), "target": frame["target"].astype(str), "weight": 1.0})


def prepare(work: Path, data_dir: Path, *, checkpoint: str | None, vocab_path: str | None) -> dict:
    """Labelled, aligned cells; control-only shards; the vocabulary; the prior graph. Cached in ``work``."""
    from scfm.data.align import align_file
    from scfm.data.vocab import Vocabulary
    from scfm.tasks.perturb.guides import assign_file

    work.mkdir(parents=True, exist_ok=True)
    labelled = work / "papalexi.labelled.h5ad"
    if not labelled.exists():
        cells, guide_matrix, table = load_papalexi(data_dir / PAPALEXI)
        cells.write_h5ad(work / "papalexi.h5ad")
        guide_matrix.write_h5ad(work / "guides.h5ad")
        table.to_csv(work / "guide_targets.tsv", sep="\t", index=False)
        assign_file(work / "papalexi.h5ad", work / "guides.h5ad", work / "guide_targets.tsv", labelled, key=KEY,
                    min_umi=5, min_ratio=2.0)
    import anndata as ad

    adata = ad.read_h5ad(labelled)
    targets = sorted(set(adata.obs[KEY].astype(str)) - {CONTROL, "unassigned"})
    if checkpoint is None:
        measured = list(map(str, adata.var_names))
        vocab = Vocabulary(measured + [t for t in targets if t not in measured])
        vocab_path = work / "vocab.tsv"
        vocab.save(vocab_path)
    else:
        from scfm.model.checkpoint import load_checkpoint

        vocab = load_checkpoint(checkpoint, version="gene", vocab=vocab_path).vocab
    tag = vocab.sha256[:12]
    aligned = work / f"papalexi.{tag}.aligned.h5ad"
    shards = work / f"control.{tag}.shards"
    if not aligned.exists():
        align_file(labelled, vocab, out_h5ad=aligned, min_coverage=0.0)
    if not shards.exists():
        controls = adata[adata.obs[KEY].astype(str) == CONTROL].copy()
        controls.write_h5ad(work / "controls.h5ad")
        align_file(work / "controls.h5ad", vocab, shards_dir=shards, min_coverage=0.0)
    prior = work / "dorothea_abc.tsv"
    if not prior.exists():
        dorothea_edges(data_dir / DOROTHEA).to_csv(prior, sep="\t", index=False)
    return {"aligned": aligned, "shards": shards, "vocab": Path(vocab_path), "prior": prior, "targets": targets,
            "measured_targets": [t for t in targets if t in set(map(str, adata.var_names))],
            "n_cells": int(adata.n_obs), "labels": adata.obs[KEY].astype(str).value_counts().to_dict()}


def pretrain(work: Path, prepared: dict, steps: int, seed: int) -> tuple[Path, float]:
    run_dir = work / f"pretrain_{steps}_seed{seed}"
    model = run_dir / "model"
    started = time.perf_counter()
    if not model.exists():
        subprocess.run([SCFM, "pretrain", "--shards", prepared["shards"], "--vocab", prepared["vocab"], "-o", run_dir,
                        "--model-preset", "tiny", "--max-steps", str(steps), "--micro-batch-size", "16", "--lr", "2e-3",
                        "--warmup-steps", str(max(1, steps // 10)), "--save-every", str(steps), "--seed", str(seed),
                        "--quiet", "--mlflow-uri", f"sqlite:///{work / 'mlflow.db'}"], check=True,
                       stdout=subprocess.DEVNULL)
    return model, time.perf_counter() - started


def evaluate(work: Path, prepared: dict, features: str, checkpoint, seed: int, *, epochs: int, vocab=None) -> dict:
    from scfm.tasks.perturb.data import ScreenOptions
    from scfm.tasks.perturb.model import FitSettings
    from scfm.tasks.perturb.run import train_file

    out = work / f"perturb_{features}_seed{seed}"
    started = time.perf_counter()
    summary = train_file(
        [prepared["aligned"]], out, ScreenOptions(KEY, CONTROL, min_cells=20), checkpoint=checkpoint, vocab=vocab,
        gene_feature_kind=features, gene_graphs=[prepared["prior"]], folds=5, seed=seed,
        fit_settings=FitSettings(epochs=epochs), quiet=True, on_warning=lambda m: print(f"  warning: {m}"),
    )
    evaluation = json.loads((out / "evaluation.json").read_text())
    return {"seconds": time.perf_counter() - started, "evaluation": evaluation, "summary": summary["summary"]}


METRICS = ("pearson", "pearson_top", "mse", "mse_top", "direction_top")


def _mean_sd(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"


def tables(runs: dict, measured: list[str]) -> str:
    """Markdown: one row per method (predictor variants + baselines), mean over perturbations then seeds;
    the same for perturbations of measured and unmeasured targets."""
    lines = []
    for subset, keep in (("every target with cells", lambda t: True),
                         ("targets among the 299 measured genes", lambda t: t in measured),
                         ("targets not measured", lambda t: t not in measured)):
        rows: dict[str, dict[str, list]] = {}
        for features, per_seed in runs.items():
            for result in per_seed.values():
                for name, entry in result["evaluation"]["perturbations"].items():
                    if not keep(name):
                        continue
                    for method, metrics in entry["metrics"].items():
                        label = f"predictor [{features}]" if method == "predictor" else method
                        if method != "predictor" and features != "scfm":
                            continue  # baselines: once (the scfm run's folds and seeds)
                        rows.setdefault(label, {m: [] for m in METRICS})
                        for m in METRICS:
                            rows[label][m].append((result["seed"], metrics[m]))
        lines.append(f"\n**{subset}**\n")
        lines.append("| method | " + " | ".join(METRICS) + " |")
        lines.append("|---" * (len(METRICS) + 1) + "|")
        for label, by_metric in rows.items():
            cells = []
            for m in METRICS:
                per_seed = {}
                for seed, value in by_metric[m]:
                    if value is not None:
                        per_seed.setdefault(seed, []).append(value)
                cells.append(_mean_sd([np.mean(v) for v in per_seed.values()]))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_perturbation_table(runs: dict, seed: int) -> str:
    names = sorted(runs["scfm"][seed]["evaluation"]["perturbations"])
    methods = [("predictor [scfm]", "scfm", "predictor"), ("predictor [random]", "random", "predictor"),
               ("predictor [learned]", "learned", "predictor"), ("training_mean", "scfm", "training_mean"),
               ("linear", "scfm", "linear")]
    lines = ["| target | cells | fold | " + " | ".join(label for label, _, _ in methods) + " |",
             "|---" * (len(methods) + 3) + "|"]
    for name in names:
        entry = runs["scfm"][seed]["evaluation"]["perturbations"][name]
        values = []
        for _, features, method in methods:
            if features not in runs:
                values.append("")
                continue
            metric = runs[features][seed]["evaluation"]["perturbations"][name]["metrics"][method]["pearson_top"]
            values.append("n/a" if metric is None else f"{metric:.2f}")
        lines.append(f"| {name} | {entry['n_cells']} | {entry['fold']} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scfm_bench_perturb"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--features", nargs="+", default=["scfm", "random", "learned"])
    parser.add_argument("--checkpoint", default=None, help="Use this model instead of pretraining one.")
    parser.add_argument("--vocab", default=None, help="Vocabulary of an official .ckpt.")
    args = parser.parse_args()

    data_dir = shared_data()
    if not (data_dir / PAPALEXI).exists():
        sys.exit(f"{data_dir / PAPALEXI} not found (the shared data folder is needed)")
    started = time.perf_counter()
    prepared = prepare(args.work, data_dir, checkpoint=args.checkpoint, vocab_path=args.vocab)
    print(f"{prepared['n_cells']} cells; {len(prepared['targets'])} targets, "
          f"{len(prepared['measured_targets'])} of them among the measured genes; labels: {prepared['labels']}")
    runs: dict[str, dict[int, dict]] = {f: {} for f in args.features}
    timings = {}
    checkpoint = args.checkpoint
    if "scfm" in args.features and checkpoint is None:
        checkpoint, seconds = pretrain(args.work, prepared, args.pretrain_steps, 0)
        timings["pretrain"] = round(seconds, 1)
    for seed in args.seeds:
        for features in args.features:
            result = evaluate(args.work, prepared, features, checkpoint if features == "scfm" else None, seed,
                              epochs=args.epochs, vocab=args.vocab)
            result["seed"] = seed
            runs[features][seed] = result
            timings[f"{features} seed {seed}"] = round(result["seconds"], 1)
            print(f"seed {seed} {features}: {result['seconds']:.0f} s")
    report = tables(runs, prepared["measured_targets"])
    print(report)
    if "scfm" in runs:
        print("\nPearson on the top-20 genes per held-out target (seed %d):\n" % args.seeds[0])
        print(per_perturbation_table(runs, args.seeds[0]))
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(),
               "load_average": os.getloadavg(), "seconds": round(time.perf_counter() - started, 1)}
    print(f"\nmachine: {machine}; timings: {timings}")
    (args.work / "perturb_results.json").write_text(json.dumps(
        {"machine": machine, "timings": timings, "prepared": {k: str(v) for k, v in prepared.items()},
         "summary": {f: {s: r["summary"] for s, r in per.items()} for f, per in runs.items()},
         "tables": report}, indent=2, default=str))


if __name__ == "__main__":
    main()
