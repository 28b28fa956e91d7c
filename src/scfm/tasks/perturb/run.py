"""What ``scfm perturb train`` and ``scfm perturb predict`` run.

    train_file(inputs, output_dir, ScreenOptions(perturbation_key=..., control=...), checkpoint=..., folds=5) -> summary
    cross_validate(screen, features, graphs, ...) -> evaluation dict + held-out predictions
    predict_file(predictor_dir, output, perturbations=[...] or input=..., ...) -> summary

``train`` writes a predictor directory (see :mod:`scfm.tasks.perturb.predictor`); with ``folds >= 2``
it first cross-validates by target gene and adds ``evaluation.json`` (per held-out perturbation and
averaged, for the predictor and every baseline), ``cv_predictions.h5ad`` (held-out perturbations x
genes), ``plots/`` and ``report.html``. ``predict`` writes a perturbations x genes h5ad and, when
the perturbations' cells are given, ``<stem>.evaluation.json``.

Prediction h5ad: ``X`` = predicted mean log1p CP10k expression; ``layers['predicted_change']``;
with observations ``layers['observed']`` and ``layers['observed_change']`` (and in cross-validation one
``layers['change_<baseline>']`` per baseline); ``obs``: ``targets``, ``n_targets_seen`` (genes of the
perturbation perturbed in training), and when observed ``n_cells`` (and ``fold``);
``uns['top_changed_genes']``: a table (perturbation, rank, gene, predicted_change, observed_change) of
the top genes by |observed change| (by |predicted change| when nothing is observed);
``uns['scfm']['perturb']``: every setting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from scfm.errors import ScfmError, ScfmUsageError
from scfm.tasks.perturb import evaluate as E
from scfm.tasks.perturb.baselines import BASELINES, baseline_predictions, gene_profile_embedding
from scfm.tasks.perturb.data import COMBO_SEPARATOR, Screen, ScreenOptions, load_screen
from scfm.tasks.perturb.features import FEATURE_KINDS, random_gene_features, scfm_gene_features
from scfm.tasks.perturb.model import FitSettings
from scfm.tasks.perturb.predictor import Predictor, build_graphs, fit_predictor, targets_of_names

PREDICTOR = "predictor"
EVALUATION_FILE = "evaluation.json"
CV_PREDICTIONS_FILE = "cv_predictions.h5ad"


# ------------------------------------------------------------------------------------ outputs
def prediction_adata(names: Sequence[str], targets: Sequence[Sequence[str]], genes: Sequence[str],
                     control_mean: np.ndarray, predicted: np.ndarray, *, observed: np.ndarray | None = None,
                     baselines: dict[str, np.ndarray] | None = None, obs: dict[str, Sequence] | None = None,
                     top_k: int = 20, settings: dict | None = None):
    """The perturbations x genes h5ad described in the module docstring (as an AnnData)."""
    import anndata as ad

    frame = pd.DataFrame({"targets": ["+".join(t) for t in targets], **(obs or {})}, index=pd.Index(names, dtype=str))
    adata = ad.AnnData(X=(control_mean + predicted).astype(np.float32), obs=frame,
                       var=pd.DataFrame(index=pd.Index(genes, dtype=str)))
    adata.layers["predicted_change"] = predicted.astype(np.float32)
    if observed is not None:
        adata.layers["observed"] = (control_mean + observed).astype(np.float32)
        adata.layers["observed_change"] = observed.astype(np.float32)
    for name, change in (baselines or {}).items():
        adata.layers[f"change_{name}"] = change.astype(np.float32)
    adata.var["control_mean"] = control_mean.astype(np.float32)
    rows = []
    for i, name in enumerate(names):
        ranking = observed[i] if observed is not None else predicted[i]
        for rank, g in enumerate(E.top_genes(ranking, top_k)):
            rows.append({"perturbation": name, "rank": rank + 1, "gene": genes[g],
                         "predicted_change": float(predicted[i, g]),
                         "observed_change": float(observed[i, g]) if observed is not None else np.nan})
    adata.uns["top_changed_genes"] = pd.DataFrame(rows, columns=["perturbation", "rank", "gene", "predicted_change",
                                                                 "observed_change"])
    adata.uns["scfm"] = {"perturb": _jsonable(settings or {})}
    return adata


def _jsonable(value: Any) -> Any:
    """Settings as h5ad/JSON-friendly values (None becomes the string 'none' for h5ad)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value] if value else "[]"
    if value is None:
        return "none"
    if isinstance(value, Path):
        return str(value)
    return value


# ------------------------------------------------------------------------------------ features
def gene_features(kind: str, screen: Screen, *, loaded=None, max_cells: int = 1000, dim: int = 64, seed: int = 0,
                  batch_size: int = 8, device: str = "auto", precision: str = "auto", quiet: bool = False
                  ) -> np.ndarray | None:
    if kind == "learned":
        return None
    if kind == "random":
        return random_gene_features(len(screen.node_genes), dim, seed)
    positions = np.array([screen.vocab_genes.index(g) for g in screen.node_genes])
    return scfm_gene_features(loaded.model, screen.control_counts, positions, max_cells=max_cells, seed=seed,
                              batch_size=batch_size, device=device, precision=precision, quiet=quiet)


# ------------------------------------------------------------------------------------ cross-validation
def cross_validate(screen: Screen, features: np.ndarray | None, graphs, fit_settings: FitSettings, *,
                   n_folds: int = 5, seed: int = 0, hidden: int = 64, n_replicates: int = 32, top_k: int = 20,
                   ridge: float = 0.1, progress=None) -> dict:
    """Hold out the perturbations of each fold's target genes, train on the rest, score the held-out ones.

    Returns {"folds": {name: fold}, "names", "observed" (P, genes), "predicted": {method: (P, genes)},
    "per_perturbation": {name: {...}}, "summary": {method: {metric: mean}}}.
    """
    folds = E.target_folds(screen.targets, n_folds, seed)
    embedding = gene_profile_embedding(screen.control, n_nodes=len(screen.node_genes))
    index = {g: i for i, g in enumerate(screen.node_genes)}
    nodes = {n: [index[g] for g in screen.targets[n]] for n in screen.names}
    names = [n for fold in range(n_folds) for n in screen.names if folds[n] == fold]
    predicted = {PREDICTOR: {}, **{b: {} for b in BASELINES}}
    per_perturbation = {}
    for fold in range(n_folds):
        train = [n for n in screen.names if folds[n] != fold]
        test = [n for n in screen.names if folds[n] == fold]
        train_genes = {g for n in train for g in screen.targets[n]}
        leaked = [n for n in test if len(screen.targets[n]) == 1 and screen.targets[n][0] in train_genes]
        if leaked:  # target_folds makes this impossible; a check that stays cheap
            raise AssertionError(f"fold {fold}: held-out genes also in training: {leaked}")
        predictor, _ = fit_predictor(screen, train, features, graphs, fit_settings, hidden=hidden,
                                     n_replicates=n_replicates, seed=seed + fold, progress=progress)
        test_targets = [screen.targets[n] for n in test]
        results = {PREDICTOR: predictor.predict_change(test_targets)}
        results.update(baseline_predictions([nodes[n] for n in train], screen.mean_change(train),
                                            [nodes[n] for n in test], embedding, ridge))
        observed = screen.mean_change(test)
        for i, name in enumerate(test):
            for method, values in results.items():
                predicted[method][name] = values[i]
            per_perturbation[name] = {
                "fold": fold, "targets": list(screen.targets[name]), "n_cells": screen.n_cells(name),
                "n_targets_seen": E.seen_targets(screen.targets[name], train_genes),
                "metrics": {m: E.change_metrics(values[i], observed[i], top_k) for m, values in results.items()},
            }
    return {
        "folds": folds, "names": names, "observed": screen.mean_change(names),
        "predicted": {m: np.stack([values[n] for n in names]) for m, values in predicted.items()},
        "per_perturbation": {n: per_perturbation[n] for n in names},
        "summary": E.summarise({n: per_perturbation[n]["metrics"] for n in names}),
    }


def evaluation_document(cv: dict, screen: Screen, *, n_folds: int, top_k: int, settings: dict, graphs) -> dict:
    return {
        "split": "by target genes: every perturbation of a held-out gene (all its guides) is held out together",
        "n_folds": n_folds, "top_k": top_k, "scale": "log1p counts per 10k; changes are from the control mean",
        "methods": [PREDICTOR, *BASELINES], "predictor_gene_features": settings.get("gene_features"),
        "metrics": list(E.METRICS), "summary": cv["summary"], "perturbations": cv["per_perturbation"],
        "n_genes_scored": len(screen.genes), "n_control_cells": int(screen.control.shape[0]),
        "skipped_small": screen.skipped_small, "skipped_unknown_targets": screen.skipped_unknown,
        "gene_graph": graphs[0].summary(), "perturbation_graph": graphs[1].summary(), "settings": settings,
    }


# ------------------------------------------------------------------------------------ train
def train_file(
    inputs: Sequence[str | Path],
    output_dir: str | Path,
    options: ScreenOptions,
    *,
    checkpoint: str | Path | None = None,
    vocab: str | Path | None = None,
    version: str = "gene",
    gene_graphs: Sequence[str | Path] = (),
    coexpression: bool = True,
    coexpression_threshold: float = 0.4,
    coexpression_k: int = 20,
    gene_feature_kind: str = "scfm",
    random_dim: int = 64,
    control_cells: int = 1000,
    embed_batch_size: int = 8,
    device: str = "auto",
    precision: str = "auto",
    hidden: int = 64,
    fit_settings: FitSettings = FitSettings(),
    n_replicates: int = 32,
    folds: int = 5,
    top_k: int = 20,
    ridge: float = 0.1,
    seed: int = 0,
    quiet: bool = False,
    on_warning=None,
) -> dict:
    """Load, check, (cross-validate,) fit on every perturbation and write OUTPUT_DIR atomically."""
    from scfm import __version__
    from scfm.report import perturb as report
    from scfm.utils import atomic_output, progress

    output_dir = Path(output_dir)
    if gene_feature_kind not in FEATURE_KINDS:
        raise ScfmUsageError(f"unknown gene features {gene_feature_kind!r} (choose from {', '.join(FEATURE_KINDS)})")
    if gene_feature_kind == "scfm" and checkpoint is None:
        raise ScfmUsageError("--gene-features scfm needs --checkpoint (or choose random / learned)")
    if folds == 1 or folds < 0:
        raise ScfmUsageError(f"--folds must be 0 (no cross-validation) or at least 2, got {folds}")
    started = time.perf_counter()
    loaded, vocab_genes, provenance = None, None, {}
    if checkpoint is not None:
        from scfm.model.checkpoint import load_checkpoint
        from scfm.tasks.embed import checkpoint_sha256

        loaded = load_checkpoint(checkpoint, version=version, vocab=vocab)
        vocab_genes = list(loaded.vocab.genes)
        provenance = {"checkpoint": str(checkpoint), "checkpoint_sha256": checkpoint_sha256(checkpoint, version),
                      "vocab_sha256": loaded.vocab.sha256}
    screen = load_screen(inputs, options, vocab_genes=vocab_genes)
    if on_warning is not None:
        _warn_skipped(screen, options.min_cells, on_warning)
    if screen.control.shape[0] < 2:
        raise ScfmError(f"only {screen.control.shape[0]} control cell(s) ('{options.control}'): a control mean "
                        "needs more", inputs[0])
    graphs = build_graphs(screen, gene_graphs, coexpression=coexpression, threshold=coexpression_threshold,
                          k=coexpression_k)
    settings = {
        "inputs": [str(p) for p in inputs], **options.to_dict(), "gene_graphs": [str(p) for p in gene_graphs],
        "coexpression": coexpression, "coexpression_threshold": coexpression_threshold,
        "coexpression_k": coexpression_k, "gene_features": gene_feature_kind, "control_cells": control_cells,
        "hidden": hidden, "fit": fit_settings.to_dict(), "n_replicates": n_replicates, "folds": folds,
        "top_k": top_k, "ridge": ridge, "seed": seed, "version": version, "scfm_version": __version__, **provenance,
    }
    if gene_feature_kind == "scfm":  # decided once and recorded, as every step that runs the model
        from scfm.tasks.embed import decide_precision

        choice = decide_precision(loaded.model, screen.control_counts, precision, device, output="genes")
        settings.update(choice.as_params())
        precision = choice.precision
    features = gene_features(gene_feature_kind, screen, loaded=loaded, max_cells=control_cells, dim=random_dim,
                             seed=seed, batch_size=embed_batch_size, device=device, precision=precision, quiet=quiet)
    n_fits = (folds if folds else 0) + 1
    evaluation = cv = None
    with progress(total=n_fits * fit_settings.epochs, desc="perturb train", unit="epoch", quiet=quiet) as bar:
        if folds:
            cv = cross_validate(screen, features, graphs, fit_settings, n_folds=folds, seed=seed, hidden=hidden,
                                n_replicates=n_replicates, top_k=top_k, ridge=ridge, progress=bar)
            evaluation = evaluation_document(cv, screen, n_folds=folds, top_k=top_k, settings=settings, graphs=graphs)
        predictor, losses = fit_predictor(screen, screen.names, features, graphs, fit_settings, hidden=hidden,
                                          n_replicates=n_replicates, seed=seed, progress=bar, settings=settings)
    with atomic_output(output_dir) as tmp:
        predictor.save(tmp)
        (tmp / "train_log.json").write_text(json.dumps({"loss": losses}) + "\n")
        if cv is not None:
            (tmp / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2, allow_nan=False) + "\n")
            baselines = {m: v for m, v in cv["predicted"].items() if m != PREDICTOR}
            cv_adata = prediction_adata(
                cv["names"], [screen.targets[n] for n in cv["names"]], screen.genes, screen.control_mean,
                cv["predicted"][PREDICTOR], observed=cv["observed"], baselines=baselines, top_k=top_k,
                obs={"fold": [cv["folds"][n] for n in cv["names"]],
                     "n_cells": [screen.n_cells(n) for n in cv["names"]],
                     "n_targets_seen": [cv["per_perturbation"][n]["n_targets_seen"] for n in cv["names"]]},
                settings=settings)
            cv_adata.write_h5ad(tmp / CV_PREDICTIONS_FILE)
            report.write_plots(cv_adata, evaluation, tmp / "plots")
            (tmp / "report.html").write_text(report.standalone_html(tmp, title=f"scfm perturb: {output_dir.name}"),
                                             encoding="utf-8")
    return {"output": str(output_dir), "n_perturbations": len(screen.names), "n_genes": len(screen.genes),
            "n_control_cells": int(screen.control.shape[0]), "skipped_small": screen.skipped_small,
            "skipped_unknown_targets": screen.skipped_unknown, "final_loss": losses[-1] if losses else None,
            "summary": evaluation["summary"] if evaluation else None, "gene_graph": graphs[0].summary(),
            "perturbation_graph": graphs[1].summary(), "seconds": time.perf_counter() - started,
            "settings": settings}


def _warn_skipped(screen: Screen, min_cells: int, warn) -> None:
    if screen.skipped_small:
        listed = ", ".join(f"{n} ({c})" for n, c in sorted(screen.skipped_small.items()))
        warn(f"skipped {len(screen.skipped_small)} perturbation(s) with fewer than {min_cells} cells: {listed}")
    if screen.skipped_unknown:
        listed = ", ".join(f"{n} ({'+'.join(g)})" for n, g in sorted(screen.skipped_unknown.items()))
        warn(f"skipped {len(screen.skipped_unknown)} perturbation(s) whose genes are not in the vocabulary: {listed}")


# ------------------------------------------------------------------------------------ predict
def predict_file(
    predictor_dir: str | Path,
    output: str | Path,
    *,
    perturbations: Sequence[str] = (),
    input_path: str | Path | None = None,
    perturbation_key: str | None = None,
    control: str | None = None,
    target_key: str | None = None,
    separator: str = COMBO_SEPARATOR,
    min_cells: int = 20,
    top_k: int = 20,
    on_warning=None,
) -> dict:
    """Predict named perturbations, or every perturbation of INPUT (scored against its cells)."""
    from scfm.utils import atomic_output

    output = Path(output)
    if output.suffix.lower() != ".h5ad":
        raise ScfmUsageError(f"output must end in .h5ad, got {output.name!r}")
    if bool(perturbations) == (input_path is not None):
        raise ScfmUsageError("give either --perturbation NAME (repeatable) or --input with --perturbation-key")
    predictor = Predictor.load(predictor_dir)
    settings = {"predictor": str(predictor_dir), "top_k": top_k,
                "gene_features": predictor.settings.get("gene_features"),
                "trained_perturbations": sorted(predictor.trained)}
    observed = screen = None
    if input_path is not None:
        if perturbation_key is None or control is None:
            raise ScfmUsageError("--input needs --perturbation-key and --control")
        options = ScreenOptions(perturbation_key, control, target_key=target_key, separator=separator,
                                min_cells=min_cells, min_gene_fraction=0.0, max_genes=None)
        screen = load_screen([input_path], options)
        if on_warning is not None:
            _warn_skipped(screen, min_cells, on_warning)
        names = screen.names
        target_sets = [screen.targets[n] for n in names]
        columns = _scored_columns(screen, predictor, input_path)
        observed = np.stack([screen.mean(n)[columns] for n in names]) - screen.control_mean[columns]
        settings.update(input=str(input_path), perturbation_key=perturbation_key, control=control)
    else:
        names = list(dict.fromkeys(perturbations))
        target_sets = targets_of_names(names, separator)
    change = predictor.predict_change(target_sets, path=input_path)[:, : predictor.n_outputs]
    trained_genes = predictor.trained_genes
    obs = {"n_targets_seen": [E.seen_targets(t, trained_genes) for t in target_sets],
           "trained": [n in predictor.trained for n in names]}
    if screen is not None:
        obs["n_cells"] = [screen.n_cells(n) for n in names]
    adata = prediction_adata(names, target_sets, predictor.scored_genes, predictor.control_mean, change,
                             observed=observed, obs=obs, top_k=top_k, settings=settings)
    evaluation = None
    if observed is not None:
        per = {n: {"targets": list(t), "n_cells": screen.n_cells(n), "trained": n in predictor.trained,
                   "n_targets_seen": E.seen_targets(t, trained_genes),
                   "metrics": {PREDICTOR: E.change_metrics(change[i], observed[i], top_k)}}
               for i, (n, t) in enumerate(zip(names, target_sets))}
        unseen = {n: v["metrics"] for n, v in per.items() if not v["trained"]}
        evaluation = {"top_k": top_k, "perturbations": per,
                      "summary": E.summarise({n: v["metrics"] for n, v in per.items()}),
                      "summary_untrained": E.summarise(unseen) if unseen else None,
                      "note": "observed change: the input's perturbed cells minus its own control cells; predicted "
                              "expression: the predictor's control mean plus the predicted change"}
    eval_path = output.with_name(f"{output.stem}.evaluation.json")
    with atomic_output(output) as tmp:
        adata.write_h5ad(tmp)
        if evaluation is not None:
            with atomic_output(eval_path) as tmp_eval:
                tmp_eval.write_text(json.dumps(evaluation, indent=2, allow_nan=False) + "\n")
    return {"output": str(output), "n_perturbations": len(names), "evaluation": evaluation,
            "evaluation_path": str(eval_path) if evaluation is not None else None}


def _scored_columns(screen: Screen, predictor: Predictor, path) -> np.ndarray:
    """Columns of the input's scored genes that are the predictor's scored genes, in its order."""
    index = {g: i for i, g in enumerate(screen.vocab_genes)}
    missing = [g for g in predictor.scored_genes if g not in index]
    if missing:
        raise ScfmError(f"{len(missing)} of the predictor's genes are not in the input (first: "
                        f"{', '.join(missing[:5])}); align the input to the same vocabulary", path)
    positions = [index[g] for g in predictor.scored_genes]
    scored = {g: i for i, g in enumerate(screen.genes)}
    return np.array([scored[screen.vocab_genes[p]] for p in positions])
