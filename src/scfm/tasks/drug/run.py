"""What ``scfm drug train | predict | adapt | score`` run: files in, checked, one output written atomically.

    train_file(cells, response, smiles, output_dir, ...)  -> summary   model dir + predictions.tsv, metrics.json, plots/
    predict_file(cells, model_dir, output_tsv, ...)       -> summary   predictions TSV (+ metrics JSON with --response)
    adapt_file(source, response, targets, output_dir, ...) -> summary  sensitivity model dir + metrics.json, plots/
    score_file(input, output, model_dir, ...)             -> summary   h5ad with obs['scfm_<drug>_sensitivity']
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from scfm.errors import ScfmError
from scfm.tasks.drug import data as drug_data
from scfm.tasks.drug.fingerprints import DEFAULT_BITS, DEFAULT_RADIUS, morgan_fingerprints
from scfm.tasks.drug.regression import (MIN_PAIRS_PER_DRUG, RegressorSettings, assign_split, fit_drug_model,
                                        load_drug_model, regression_metrics, split_metrics)
from scfm.tasks.drug.transfer import (TransferSettings, SensitivityModel, load_sensitivity_model, obs_key,
                                      sensitivity_labels, standardise, train_sensitivity)
from scfm.utils import atomic_output


def finite_or_none(value):
    """NaN (e.g. a correlation on constant values) becomes null: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite_or_none(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(finite_or_none(obj), indent=2, allow_nan=False) + "\n")


def check_embedding_space(model_settings: dict, input_settings: dict, path, *, ignore=()) -> None:
    """Embeddings made with other weights or settings than the model was trained on are refused."""
    from scfm.tasks.annotate import EMBEDDING_SPACE_KEYS

    model_settings, input_settings = _plain_settings(model_settings), _plain_settings(input_settings)
    differing = [f"{key}: model {model_settings[key]!r} vs input {input_settings[key]!r}"
                 for key in EMBEDDING_SPACE_KEYS
                 if key not in ignore and key in model_settings and key in input_settings
                 and json.dumps(model_settings[key], sort_keys=True, default=str)
                 != json.dumps(input_settings[key], sort_keys=True, default=str)]
    if differing:
        raise ScfmError(f"the input was embedded differently from the model's training data ({'; '.join(differing)})",
                        path)


def _plain_settings(settings: dict) -> dict:
    from scfm.tasks.annotate import EMBEDDING_SPACE_KEYS, _plain

    return {k: _plain(settings[k]) for k in EMBEDDING_SPACE_KEYS if k in settings}


# ---------------------------------------------------------------------------------------- train
def train_file(cells_path, response_path, smiles_path, output_dir, *, representation: str = "scfm",
               embedding_key: str = "X_scfm", split_by: str = "cell_line", test_fraction: float = 0.1,
               val_fraction: float = 0.1, settings: RegressorSettings | None = None, radius: int = DEFAULT_RADIUS,
               n_bits: int = DEFAULT_BITS, progress=None, log_epoch=None) -> dict:
    settings = settings or RegressorSettings()
    output_dir = Path(output_dir)
    cells = drug_data.read_cells(cells_path, representation, embedding_key)
    response = drug_data.read_response(response_path)
    smiles = drug_data.read_smiles(smiles_path)
    wanted = {d: smiles[d] for d in sorted(set(response["drug"]) & set(smiles))}
    fingerprints = morgan_fingerprints(wanted, radius=radius, n_bits=n_bits)
    pairs, dropped = drug_data.overlapping_pairs(response, cells.names, fingerprints.drugs,
                                                 response_path=response_path, cells_path=cells_path)
    dropped["drugs_with_unparsable_smiles"] = fingerprints.unparsable
    dropped["drugs_without_smiles"] = sorted(set(dropped["drugs_without_smiles"]) - set(fingerprints.unparsable))
    used = sorted(set(pairs["drug"]))
    keep = [fingerprints.drugs.index(d) for d in used]
    fingerprints.drugs, fingerprints.bits = used, fingerprints.bits[keep]
    split = assign_split(pairs, split_by, test_fraction, val_fraction, settings.seed)
    model, predictions, history = fit_drug_model(
        cells, pairs, fingerprints, split, representation=representation, smiles=wanted, settings=settings,
        fingerprint_params={"kind": "morgan", "radius": radius, "n_bits": n_bits}, progress=progress,
        log_epoch=log_epoch)
    if representation == "scfm":
        model.embed_settings = _plain_settings(cells.embed_settings)
    metrics = {"split_by": split_by, "representation": representation, "best_epoch": model.extra["best_epoch"],
               "epochs_run": len(history), "n_cell_lines": int(pairs["cell_line"].nunique()),
               "n_drugs": len(used), **split_metrics(predictions), "dropped": dropped}
    model.extra.update({"split_by": split_by, "test_fraction": test_fraction, "val_fraction": val_fraction,
                        "metrics": {k: metrics[k] for k in ("test", "val") if k in metrics}})
    model.extra = finite_or_none(model.extra)
    from scfm.tasks.drug.plots import write_regression_plots

    with atomic_output(output_dir) as tmp:
        model.save(tmp)
        predictions.to_csv(tmp / "predictions.tsv", sep="\t", index=False, float_format="%.5g")
        _write_json(tmp / "metrics.json", metrics)
        _write_json(tmp / "history.json", history)
        write_regression_plots(tmp / "plots", history, predictions, MIN_PAIRS_PER_DRUG)
    return metrics


# -------------------------------------------------------------------------------------- predict
def _requested_drugs(model_drugs: list[str], drugs, extra_smiles: dict[str, str], model_dir, smiles_path):
    wanted = list(drugs) if drugs else list(model_drugs)
    unknown = [d for d in wanted if d not in model_drugs and d not in extra_smiles]
    if unknown:
        where = f"nor in {smiles_path}" if smiles_path else "(give its SMILES with --smiles to score a new drug)"
        raise ScfmError(f"drug {unknown[0]!r} is not in the model {where}"
                        + (f" ({len(unknown)} such drugs)" if len(unknown) > 1 else ""), model_dir)
    return wanted


def predict_file(cells_path, model_dir, output_path, *, drugs=None, smiles_path=None, response_path=None,
                 embedding_key: str = "X_scfm") -> dict:
    """Predict ln IC50 for every cell line x drug; with ``response_path``, only the measured pairs, scored."""
    model = load_drug_model(model_dir)
    output_path = Path(output_path)
    extra_smiles = drug_data.read_smiles(smiles_path) if smiles_path else {}
    wanted = _requested_drugs(model.fingerprints.drugs, drugs, extra_smiles, model_dir, smiles_path)
    new = {d: extra_smiles[d] for d in wanted if d not in model.fingerprints.drugs}
    new_fp = morgan_fingerprints(new, radius=model.fingerprint.get("radius", DEFAULT_RADIUS),
                                 n_bits=model.fingerprint.get("n_bits", DEFAULT_BITS))
    if new_fp.unparsable:
        raise ScfmError(f"RDKit cannot parse the SMILES of {new_fp.unparsable[0]!r}", smiles_path)
    table = dict(zip(model.fingerprints.drugs, model.fingerprints.bits)) | dict(zip(new_fp.drugs, new_fp.bits))

    cells = drug_data.read_cells(cells_path, model.representation, embedding_key)
    if model.representation == "scfm":
        check_embedding_space(model.embed_settings, cells.embed_settings, cells_path)
    features = model.features(cells, cells_path)
    if response_path:
        response = drug_data.read_response(response_path)
        response = response[response["drug"].isin(wanted)]
        if response.empty:
            raise ScfmError(f"no response values for the drugs asked for ({', '.join(wanted[:5])})", response_path)
        pairs, dropped = drug_data.overlapping_pairs(response, cells.names, wanted, response_path=response_path,
                                                     cells_path=cells_path)
    else:
        pairs = pd.DataFrame([(c, d) for d in wanted for c in cells.names], columns=["cell_line", "drug"])
        dropped = {}
    line_row = pd.Series(np.arange(len(cells.names)), index=cells.names)
    bits = np.stack([table[d] for d in wanted]).astype(np.float32)
    drug_row = pd.Series(np.arange(len(wanted)), index=wanted)
    predicted = model.predict_pairs(features, bits, line_row.loc[pairs["cell_line"]].to_numpy(),
                                    drug_row.loc[pairs["drug"]].to_numpy())
    pairs = pairs.assign(predicted_ln_ic50=predicted, drug_in_training=pairs["drug"].isin(model.fingerprints.drugs))
    summary = {"n_cell_lines": int(pairs["cell_line"].nunique()), "n_drugs": len(wanted), "n_pairs": len(pairs),
               "new_drugs": sorted(new)}
    if response_path:
        summary["metrics"] = regression_metrics(pairs["ln_ic50"], pairs["predicted_ln_ic50"], pairs["drug"])
        summary["dropped"] = dropped
    metrics_path = output_path.with_name(f"{output_path.stem}.metrics.json")
    with atomic_output(output_path) as tmp:
        pairs.to_csv(tmp, sep="\t", index=False, float_format="%.5g")
        if response_path:
            with atomic_output(metrics_path) as tmp_metrics:
                _write_json(tmp_metrics, summary)
    return summary


# ---------------------------------------------------------------------------------------- adapt
def _shared_features(source: drug_data.CellTable, targets: list[drug_data.CellTable], representation, paths):
    if representation == "scfm":
        for target, path in zip(targets, paths[1:]):
            # bulk lines and single cells go through different input paths of the same weights
            check_embedding_space(source.embed_settings, target.embed_settings, path,
                                  ignore=("input_type", "target_depth", "pre_normalized"))
        dims = {t.values.shape[1] for t in targets} | {source.values.shape[1]}
        if len(dims) > 1:
            raise ScfmError(f"bulk and single-cell embeddings differ in width ({sorted(dims)}): embed both with "
                            "the same checkpoint and --pool", paths[1])
        return None, source.values, [t.values for t in targets]
    genes = [g for g in source.genes if all(g in set(t.genes) for t in targets)]
    if not genes:
        raise ScfmError("the bulk and single-cell inputs share no gene (var_names)", paths[1])
    src = drug_data.reorder_genes(source, genes, paths[0])
    return genes, src, [drug_data.reorder_genes(t, genes, p) for t, p in zip(targets, paths[1:])]


def adapt_file(source_path, response_path, target_paths, output_dir, *, drugs, representation: str = "scfm",
               embedding_key: str = "X_scfm", settings: TransferSettings | None = None, progress=None) -> dict:
    """Train one sensitivity classifier per drug on bulk lines, adapted to the cells of ``target_paths``."""
    settings = settings or TransferSettings()
    if representation not in ("scfm", "expression"):
        raise ScfmError(f"transfer representation must be scfm or expression, not {representation!r}")
    if not 0 < settings.sensitive_quantile < 1:
        raise ScfmError(f"--sensitive-quantile must be between 0 and 1, got {settings.sensitive_quantile}")
    source = drug_data.read_cells(source_path, representation, embedding_key)
    targets = [drug_data.read_cells(p, representation, embedding_key) for p in target_paths]
    response = drug_data.read_response(response_path)
    paths = [source_path, *target_paths]
    genes, src, tgts = _shared_features(source, targets, representation, paths)
    target = np.vstack(tgts)
    src_mean, src_scale = standardise(src)
    tgt_mean, tgt_scale = standardise(target)
    src_std = ((src - src_mean) / src_scale).astype(np.float32)
    tgt_std = ((target - tgt_mean) / tgt_scale).astype(np.float32)
    line_row = pd.Series(np.arange(len(source.names)), index=source.names)

    nets, thresholds, metrics = {}, {}, {}
    for drug in drugs:
        measured = response[response["drug"] == drug]
        if measured.empty:
            raise ScfmError(f"drug {drug!r} has no response values", response_path)
        measured, _ = drug_data.overlapping_pairs(measured, source.names, [drug], response_path=response_path,
                                                  cells_path=source_path)
        labels, thresholds[drug] = sensitivity_labels(measured["ln_ic50"], settings.sensitive_quantile)
        rows = line_row.loc[measured["cell_line"]].to_numpy()
        try:
            nets[drug], metrics[drug] = train_sensitivity(src_std[rows], labels, tgt_std, settings)
        except ScfmError as exc:
            raise ScfmError(f"drug {drug!r}: {exc.message}", response_path) from exc
        if progress is not None:
            progress.update(1)
    model = SensitivityModel(nets, representation, settings, thresholds, tgt_mean, tgt_scale, genes,
                             _plain_settings(targets[0].embed_settings) if representation == "scfm" else {},
                             {"source_embed_settings": _plain_settings(source.embed_settings)
                              if representation == "scfm" else {},
                              "n_target_cells": int(len(target)), "targets": [str(p) for p in target_paths]})
    summary = {"representation": representation, "drugs": list(drugs), "thresholds": thresholds,
               "per_drug": {d: {k: v for k, v in m.items() if k != "history"} for d, m in metrics.items()}}
    model.extra["metrics"] = finite_or_none(summary["per_drug"])
    from scfm.tasks.drug.plots import transfer_curves_png

    with atomic_output(output_dir) as tmp:
        model.save(tmp)
        _write_json(tmp / "metrics.json", {**summary, "history": {d: m["history"] for d, m in metrics.items()}})
        (tmp / "plots").mkdir()
        (tmp / "plots" / "training_curves.png").write_bytes(
            transfer_curves_png({d: m["history"] for d, m in metrics.items()}))
    return summary


# ---------------------------------------------------------------------------------------- score
def score_file(input_path, output_path, model_dir, *, drugs=None, embedding_key: str = "X_scfm") -> dict:
    """Write ``obs['scfm_<drug>_sensitivity']`` for each drug of the model (or the ``drugs`` asked for)."""
    import anndata as ad

    model = load_sensitivity_model(model_dir)
    wanted = list(drugs) if drugs else list(model.nets)
    unknown = [d for d in wanted if d not in model.nets]
    if unknown:
        raise ScfmError(f"drug {unknown[0]!r} is not in the model (it has {', '.join(model.nets)})", model_dir)
    cells = drug_data.read_cells(input_path, model.representation, embedding_key)
    if model.representation == "scfm":
        check_embedding_space(model.embed_settings, cells.embed_settings, input_path)
        values = cells.values
    else:
        values = drug_data.reorder_genes(cells, model.genes, input_path)
    if values.shape[1] != len(model.target_mean):
        raise ScfmError(f"the input has {values.shape[1]} features, the model {len(model.target_mean)}", input_path)
    standardised = ((values - model.target_mean) / model.target_scale).astype(np.float32)
    adata = ad.read_h5ad(input_path)
    scores = {}
    for drug in wanted:
        scores[obs_key(drug)] = model.nets[drug].sensitivity(standardised).astype(np.float32)
        adata.obs[obs_key(drug)] = scores[obs_key(drug)]
    uns = dict(adata.uns.get("scfm", {}))
    uns["drug"] = {"model": str(model_dir), "drugs": wanted, "columns": [obs_key(d) for d in wanted],
                   "representation": model.representation,
                   "thresholds": {d: model.thresholds[d] for d in wanted},
                   "score": "probability of ln IC50 at or below the drug's threshold on bulk lines "
                            f"(quantile {model.settings.sensitive_quantile})"}
    adata.uns["scfm"] = uns
    with atomic_output(output_path) as tmp:
        adata.write_h5ad(tmp)
    return {"n_cells": adata.n_obs, "drugs": wanted,
            "mean_sensitivity": {d: float(scores[obs_key(d)].mean()) for d in wanted}}
