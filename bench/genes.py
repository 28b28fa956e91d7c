"""Gene embeddings against curated biology: TF -> target edges vs DoRothEA, gene modules vs GO BP.

    python bench/genes.py [--work DIR] [--steps 800] [--papalexi-cells 3000] [--skip-grnboost2]

For each data set (the demo's 700 real PBMCs x 765 genes; a seeded subset of the Papalexi et al. THP-1
ECCITE-seq cells x 299 genes from ../shared/data) a ``tiny`` model is pretrained here with ``scfm pretrain``
(the demo's settings: ``--steps`` steps of 16 cells), and the decoder's gene context embeddings are averaged
over every cell (``scfm genes``' machinery). Genes tested: detected in >= 10 cells.

**Edges vs DoRothEA** (confidence A-C as truth). Candidate TFs: Lambert et al. TFs present among the tested
genes that have at least one A-C target among them; candidate edges: every such TF x every other tested gene.
Scores: cosine similarity of the centred mean gene embeddings (the trained model, the same model untrained,
and PCA loadings), its absolute value, |Pearson| and |Spearman| correlation of log1p CP10k expression,
GRNBoost2 importance (arboreto, the method pySCENIC uses, with every Lambert TF present as regulator), and
random scores (mean of 20 draws). Metrics: AUPRC, AUPRC over the random expectation (the share of true
edges), and early precision: precision among the top k edges, k = the number of true edges, over that share
(BEELINE's EPR). Runtime: seconds of each method on this machine, the model's pass included for scfm.

**Modules vs GO BP**: the same cosine kNN + Leiden procedure (15 neighbours, resolution 1, modules of >= 5
genes) on each gene embedding; a module is enriched when a GO BP term has BH q < 0.05 (hypergeometric, the
tested genes with an annotation as universe). Reported: modules, enriched modules, fraction, and the share of
the centred embedding's variance that a linear fit on each gene's mean expression and detection rate explains
(the "expression level regressed out" rows use the residual of that fit).

Prints markdown tables and writes ``<work>/genes_results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

REPO = Path(__file__).resolve().parent.parent
SCFM = str(Path(sys.executable).with_name("scfm"))
MIN_CELLS = 10
RANDOM_DRAWS = 20


def shared_data_dir() -> Path:
    """$SCFM_SHARED_DATA, else the first ``shared/data`` beside the checkout or one of its parents."""
    if os.environ.get("SCFM_SHARED_DATA"):
        return Path(os.environ["SCFM_SHARED_DATA"])
    for parent in REPO.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    raise SystemExit("the shared real-data folder (../shared/data) is absent")


# ------------------------------------------------------------------------------------------ data
def load_pbmc():
    from scfm.data.demo_data import LABEL_KEY, pbmc68k_counts

    adata = pbmc68k_counts()
    adata.obs["group"] = adata.obs[LABEL_KEY].astype(str)
    return adata


def _triplets(matrix) -> sp.csr_matrix:
    """An R dgTMatrix read by rdata -> scipy CSR (rows x columns as in R)."""
    shape = tuple(int(d) for d in matrix.Dim)
    return sp.coo_matrix((np.asarray(matrix.x, dtype=np.float32), (np.asarray(matrix.i), np.asarray(matrix.j))),
                         shape=shape).tocsr()


def guide_labels(guides: sp.csr_matrix, targets: np.ndarray, *, min_umis: int = 5, ratio: float = 2.0) -> np.ndarray:
    """Per cell: the target of its most counted guide when that guide has >= ``min_umis`` UMIs and >= ``ratio``
    times the second guide, else "unassigned" (guides x cells in, one label per cell out)."""
    dense = guides.T.toarray()
    order = np.argsort(-dense, axis=1)
    top = dense[np.arange(len(dense)), order[:, 0]]
    second = dense[np.arange(len(dense)), order[:, 1]]
    clear = (top >= min_umis) & (top >= ratio * second)
    return np.where(clear, targets[order[:, 0]], "unassigned")


def load_papalexi(n_cells: int, seed: int = 0):
    """A seeded subset of the THP-1 cells (raw counts, 299 genes), labelled by the gene their guide targets."""
    import warnings

    import anndata as ad
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata names the R classes it maps by hand
        data = rdata.read_rda(shared_data_dir() / "papalexi2021_thp1_eccite_lowmoi.rda")["lowmoi_example_data"]
    counts = _triplets(data["response_matrix"]).T.tocsr()  # cells x genes
    genes = [str(g) for g in data["response_matrix"].Dimnames[0]]
    frame = data["grna_target_data_frame"]
    target_of = dict(zip(frame["grna_id"].astype(str), frame["grna_target"].astype(str)))
    guide_names = [str(g) for g in data["grna_matrix"].Dimnames[0]]
    labels = guide_labels(_triplets(data["grna_matrix"]), np.array([target_of[g] for g in guide_names]))
    keep = np.flatnonzero(np.asarray(counts.sum(axis=1)).ravel() > 0)
    chosen = np.sort(np.random.default_rng(seed).choice(keep, size=min(n_cells, len(keep)), replace=False))
    adata = ad.AnnData(X=counts[chosen].astype(np.float32), obs=pd.DataFrame({"group": labels[chosen]}))
    adata.obs_names = [f"thp1_{i}" for i in chosen]
    adata.var_names = genes
    return adata


def prepare(name: str, adata, work: Path) -> dict:
    """Vocabulary, aligned h5ad and Parquet shards of one data set."""
    from scfm.data.shards import ShardWriter
    from scfm.data.vocab import Vocabulary

    root = work / name
    root.mkdir(parents=True, exist_ok=True)
    vocab = Vocabulary(list(map(str, adata.var_names)))
    vocab.save(root / "vocab.tsv")
    if not (root / "shards" / "manifest.json").exists():
        with ShardWriter(root / "shards", vocab, [], cells_per_shard=len(adata), row_group_size=50) as writer:
            writer.write(list(adata.obs_names), sp.csr_matrix(adata.X), adata.obs)
    return {"root": root, "vocab": root / "vocab.tsv", "shards": root / "shards"}


def pretrain(paths: dict, steps: int, seed: int) -> tuple[Path, float]:
    """``scfm pretrain`` with the demo's settings (tiny, 16 cells a step, lr 2e-3); reuses a finished run."""
    out = paths["root"] / f"pretrain_{steps}"
    model = out / "model"
    if (model / "model.safetensors").exists():
        return model, float("nan")
    started = time.perf_counter()
    subprocess.run([SCFM, "pretrain", "--shards", paths["shards"], "--vocab", paths["vocab"], "-o", out,
                    "--model-preset", "tiny", "--max-steps", str(steps), "--micro-batch-size", "16", "--lr", "2e-3",
                    "--warmup-steps", str(max(1, steps // 10)), "--save-every", str(steps), "--seed", str(seed),
                    "--quiet", "--mlflow-uri", f"sqlite:///{paths['root'] / 'mlflow.db'}"], check=True,
                   stdout=subprocess.DEVNULL)
    return model, time.perf_counter() - started


# ---------------------------------------------------------------------------------- embeddings
def tested_genes(counts: sp.csr_matrix) -> np.ndarray:
    from scfm.tasks.genes.embeddings import gene_statistics, select_genes

    return select_genes(gene_statistics(counts), MIN_CELLS)


def log_expression(counts: sp.csr_matrix, genes: np.ndarray) -> np.ndarray:
    from scfm.tasks.genes.embeddings import log_normalised

    return log_normalised(counts)[:, genes].toarray()


def scfm_gene_embeddings(model, counts: sp.csr_matrix, genes: np.ndarray) -> tuple[np.ndarray, float]:
    from scfm.tasks.genes.embeddings import mean_gene_embeddings

    started = time.perf_counter()
    means = mean_gene_embeddings(model, counts, genes, device="cpu")
    return means.overall, time.perf_counter() - started


def expression_level(counts: sp.csr_matrix, genes: np.ndarray) -> np.ndarray:
    """genes x 2: each gene's mean log1p CP10k and the share of cells detecting it."""
    from scfm.tasks.genes.embeddings import gene_statistics

    stats = gene_statistics(counts)
    return np.c_[stats.mean_expression[genes], stats.n_cells_detected[genes] / stats.n_cells]


def explained_by(vectors: np.ndarray, covariates: np.ndarray) -> tuple[float, np.ndarray]:
    """(share of the centred embedding's variance a linear fit on ``covariates`` explains, the residuals)."""
    from sklearn.linear_model import LinearRegression

    from scfm.tasks.genes.modules import centre

    centred = centre(vectors).astype(np.float64)
    residual = centred - LinearRegression().fit(covariates, centred).predict(covariates)
    return float(1 - (residual ** 2).sum() / (centred ** 2).sum()), residual.astype(np.float32)


def untrained_like(checkpoint: Path):
    """A model of the same shape and vocabulary as ``checkpoint``, at its random initialisation."""
    from scfm.model.checkpoint import load_checkpoint
    from scfm.model.xtrimogene import XTrimoGene

    config = load_checkpoint(checkpoint).config
    return XTrimoGene(config, seed=0)


# ------------------------------------------------------------------------------------- network
def dorothea_ac() -> pd.DataFrame:
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = rdata.read_rda(shared_data_dir() / "dorothea_hs.rda")["dorothea_hs"]
    return table[table["confidence"].astype(str).isin(["A", "B", "C"])]


def lambert_tfs() -> list[str]:
    from scfm.tasks.genes.network import load_tf_list

    return load_tf_list(shared_data_dir() / "lambert2018_human_tfs.txt")


def candidate_edges(names: list[str], tfs: list[str], truth: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the candidate TFs in ``names``, TFs x genes boolean truth); the TF-self pair is excluded later."""
    present = set(names)
    edges = truth[truth["tf"].isin(present) & truth["target"].isin(present) & (truth["tf"] != truth["target"])]
    with_targets = set(edges["tf"]) & set(tfs)
    index = {n: i for i, n in enumerate(names)}
    tf_rows = np.array(sorted(index[t] for t in with_targets), dtype=np.int64)
    mask = np.zeros((len(tf_rows), len(names)), dtype=bool)
    row_of = {names[i]: r for r, i in enumerate(tf_rows)}
    for tf, target in zip(edges["tf"], edges["target"]):
        if tf in row_of:
            mask[row_of[tf], index[target]] = True
    return tf_rows, mask


def ranking_metrics(scores: np.ndarray, truth: np.ndarray, tf_rows: np.ndarray) -> dict:
    """AUPRC, its ratio to the share of true edges, and early precision ratio over TF x gene candidates."""
    from sklearn.metrics import average_precision_score

    valid = np.ones_like(truth)
    valid[np.arange(len(tf_rows)), tf_rows] = False  # no TF -> itself
    y, s = truth[valid], np.nan_to_num(scores[valid], nan=-np.inf)
    share = y.mean()
    k = int(y.sum())
    top = np.argsort(-s, kind="stable")[:k]
    auprc = float(average_precision_score(y, s))
    return {"auprc": auprc, "auprc_ratio": auprc / share, "early_precision": float(y[top].mean()),
            "epr": float(y[top].mean() / share), "n_true": k, "n_candidates": int(y.size)}


def correlation_scores(expression: np.ndarray, tf_rows: np.ndarray, method: str) -> np.ndarray:
    from scipy.stats import rankdata

    values = expression if method == "pearson" else np.apply_along_axis(rankdata, 0, expression)
    centred = values - values.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    unit = centred / np.where(norms > 0, norms, 1.0)
    return np.abs(unit[:, tf_rows].T @ unit)


def grnboost2_scores(expression: np.ndarray, names: list[str], regulators: list[str], tf_rows: np.ndarray,
                     seed: int) -> np.ndarray:
    """GRNBoost2 (arboreto) importances of every regulator for every gene, as a TFs x genes matrix."""
    from arboreto.algo import grnboost2
    from distributed import Client, LocalCluster

    frame = pd.DataFrame(expression, columns=names)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        adjacencies = grnboost2(frame, tf_names=regulators, client_or_address=client, seed=seed)
    index = {n: i for i, n in enumerate(names)}
    row_of = {names[i]: r for r, i in enumerate(tf_rows)}
    scores = np.zeros((len(tf_rows), len(names)))
    for tf, target, importance in adjacencies[["TF", "target", "importance"]].itertuples(index=False):
        if tf in row_of:
            scores[row_of[tf], index[target]] = importance
    return scores


def evaluate_network(names, embeddings: dict[str, tuple[np.ndarray, float]], expression: np.ndarray, *, seed: int,
                     with_grnboost2: bool) -> tuple[list[dict], dict]:
    from scfm.tasks.genes.network import match_tfs, tf_target_scores

    tfs = lambert_tfs()
    tf_rows, truth = candidate_edges(names, tfs, dorothea_ac())
    info = {"n_candidate_tfs": int(len(tf_rows)), "candidate_tfs": [names[i] for i in tf_rows],
            "n_true_edges": int(truth.sum() - truth[np.arange(len(tf_rows)), tf_rows].sum())}
    if not len(tf_rows):
        return [], info
    rows = []
    for label, (vectors, seconds) in embeddings.items():
        started = time.perf_counter()
        cosine = tf_target_scores(vectors, tf_rows)
        extra = time.perf_counter() - started
        rows.append({"method": f"{label} cosine", "seconds": seconds + extra, **ranking_metrics(cosine, truth, tf_rows)})
        rows.append({"method": f"{label} |cosine|", "seconds": seconds + extra,
                     **ranking_metrics(np.abs(cosine), truth, tf_rows)})
    for method in ("pearson", "spearman"):
        started = time.perf_counter()
        scores = correlation_scores(expression, tf_rows, method)
        rows.append({"method": f"|{method.capitalize()}|", "seconds": time.perf_counter() - started,
                     **ranking_metrics(scores, truth, tf_rows)})
    if with_grnboost2:
        regulators = [names[i] for i in match_tfs(tfs, names)]
        started = time.perf_counter()
        scores = grnboost2_scores(expression, names, regulators, tf_rows, seed)
        rows.append({"method": "GRNBoost2 (arboreto)", "seconds": time.perf_counter() - started,
                     **ranking_metrics(scores, truth, tf_rows)})
    rng = np.random.default_rng(seed)
    draws = [ranking_metrics(rng.random(truth.shape), truth, tf_rows) for _ in range(RANDOM_DRAWS)]
    rows.append({"method": f"random (mean of {RANDOM_DRAWS})", "seconds": 0.0,
                 **{k: float(np.mean([d[k] for d in draws])) for k in draws[0]}})
    return rows, info


# ------------------------------------------------------------------------------------- modules
def evaluate_modules(names: list[str], embeddings: dict[str, np.ndarray], *, seed: int,
                     covariates: np.ndarray | None = None) -> tuple[list[dict], dict]:
    from scfm.data import go
    from scfm.tasks.genes import modules as M
    from scfm.tasks.genes.enrichment import enrich_modules, enrichment_summary

    annotations = go.annotate_genes(names)
    term_names = go.go_term_names()
    rows = []
    for label, vectors in embeddings.items():
        found = M.find_modules(vectors, n_neighbors=15, resolution=1.0, min_module_size=5, seed=seed)
        modules = {str(m): [names[g] for g in genes] for m, genes in found.members().items()}
        summary = enrichment_summary(enrich_modules(modules, names, annotations, term_names), list(modules))
        rows.append({"embedding": label, "n_modules": summary["n_modules"],
                     "n_enriched": summary["n_modules_enriched"],
                     "fraction_enriched": summary["fraction_modules_enriched"],
                     "unassigned_genes": int((found.labels < 0).sum()),
                     "expression_level_r2": (explained_by(vectors, covariates)[0] if covariates is not None
                                             else float("nan"))})
    return rows, {"n_genes_annotated": len(annotations)}


# ----------------------------------------------------------------------------------------- main
def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_dataset(name: str, adata, work: Path, *, steps: int, seed: int, with_grnboost2: bool) -> dict:
    from scfm.model.checkpoint import load_checkpoint
    from scfm.tasks.genes.modules import pca_gene_embeddings, random_gene_embeddings

    paths = prepare(name, adata, work)
    log(f"{name}: pretraining ({steps} steps)")
    checkpoint, pretrain_seconds = pretrain(paths, steps, seed)
    log(f"{name}: gene embeddings")
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    genes = tested_genes(counts)
    names = [str(adata.var_names[g]) for g in genes]
    expression = log_expression(counts, genes)
    trained, trained_seconds = scfm_gene_embeddings(load_checkpoint(checkpoint).model, counts, genes)
    untrained, untrained_seconds = scfm_gene_embeddings(untrained_like(checkpoint), counts, genes)
    # how much of the trained embedding is just each gene's expression level, and what is left without it
    covariates = expression_level(counts, genes)
    _, residual = explained_by(trained, covariates)
    started = time.perf_counter()
    pca = pca_gene_embeddings(expression, seed=seed)
    pca_seconds = time.perf_counter() - started
    log(f"{name}: edges vs DoRothEA")
    network, network_info = evaluate_network(
        names, {"scfm (tiny, pretrained here)": (trained, trained_seconds),
                "scfm, expression level regressed out": (residual, trained_seconds),
                "scfm (same model untrained)": (untrained, untrained_seconds),
                "PCA loadings": (pca, pca_seconds)},
        expression, seed=seed, with_grnboost2=with_grnboost2)
    log(f"{name}: modules vs GO BP")
    modules, modules_info = evaluate_modules(
        names, {"scfm (tiny, pretrained here)": trained, "scfm, expression level regressed out": residual,
                "scfm (same model untrained)": untrained, "PCA loadings": pca,
                "random Gaussian": random_gene_embeddings(len(names), trained.shape[1], seed=seed)},
        seed=seed, covariates=covariates)
    return {"dataset": name, "n_cells": int(adata.n_obs), "n_genes_input": int(adata.n_vars), "n_genes_tested": len(names),
            "pretrain_steps": steps, "pretrain_seconds": pretrain_seconds, "network": network,
            "network_info": network_info, "modules": modules, "modules_info": modules_info}


def markdown(results: list[dict]) -> str:
    lines = []
    for result in results:
        info = result["network_info"]
        lines += [f"### {result['dataset']}: {result['n_cells']} cells, {result['n_genes_tested']} of "
                  f"{result['n_genes_input']} genes tested", "",
                  f"Edges: {info['n_candidate_tfs']} candidate TFs ({', '.join(info['candidate_tfs'])}), "
                  f"{info['n_true_edges']} DoRothEA A-C edges among their candidate edges.", ""]
        if result["network"]:
            lines += ["| method | AUPRC | AUPRC / random | early precision | EPR | seconds |",
                      "|---|---:|---:|---:|---:|---:|"]
            for row in result["network"]:
                lines.append(f"| {row['method']} | {row['auprc']:.4f} | {row['auprc_ratio']:.2f} | "
                             f"{row['early_precision']:.3f} | {row['epr']:.2f} | {row['seconds']:.1f} |")
        lines += ["", f"Modules vs GO BP ({result['modules_info']['n_genes_annotated']} tested genes annotated):", "",
                  "| gene embedding | modules | with a GO BP term (q < 0.05) | fraction | unassigned genes | "
                  "variance explained by expression level |",
                  "|---|---:|---:|---:|---:|---:|"]
        for row in result["modules"]:
            lines.append(f"| {row['embedding']} | {row['n_modules']} | {row['n_enriched']} | "
                         f"{row['fraction_enriched']:.2f} | {row['unassigned_genes']} | "
                         f"{row['expression_level_r2']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench_genes_work"))
    parser.add_argument("--steps", type=int, default=800, help="pretraining steps of 16 cells")
    parser.add_argument("--papalexi-cells", type=int, default=3000)
    parser.add_argument("--skip-grnboost2", action="store_true")
    parser.add_argument("--only", choices=["pbmc", "papalexi"], default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    datasets = {"pbmc": load_pbmc, "papalexi": lambda: load_papalexi(args.papalexi_cells, args.seed)}
    results = []
    for name, load in datasets.items():
        if args.only and name != args.only:
            continue
        results.append(run_dataset(name, load(), args.work, steps=args.steps, seed=args.seed,
                                   with_grnboost2=not args.skip_grnboost2))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}"
    (args.work / "genes_results.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2))
    print(f"machine: {machine}\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
