"""The report's drug-sensitivity section: per-cell scores from ``scfm drug score`` (``obs['scfm_<drug>_sensitivity']``).

    drug_section(adata, coords, *, group_key=None, seed=0) -> (HTML body, metrics dict)

Per drug: the score distribution, the share of cells called sensitive (score > 0.5), the mean score per group
(the label column, else the predicted cell type, else the batch) and UMAPs coloured by the score.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from scfm.report import plots

SCORE_COLUMN = re.compile(r"^scfm_(.+)_sensitivity$")


def sensitivity_columns(adata) -> dict[str, str]:
    """``{drug: obs column}`` for every score column present."""
    return {m.group(1): c for c in adata.obs.columns if (m := SCORE_COLUMN.match(str(c)))}


def drug_section(adata, coords: dict[str, np.ndarray], *, group_key: str | None = None, seed: int = 0
                 ) -> tuple[str, dict]:
    from scfm.report.html import img_tag, note, table
    from scfm.tasks.drug.plots import sensitivity_histogram_png

    columns = sensitivity_columns(adata)
    if not columns:
        return note("No obs['scfm_<drug>_sensitivity'] columns: score cells with `scfm drug score` "
                    "(a model from `scfm drug adapt`) to see drug sensitivity here."), {}
    scores = adata.obs[list(columns.values())].astype(float)
    metrics = {drug: {"mean": float(scores[c].mean()), "fraction_sensitive": float((scores[c] > 0.5).mean())}
               for drug, c in columns.items()}
    settings = adata.uns.get("scfm", {}).get("drug", {}) if isinstance(adata.uns.get("scfm"), dict) else {}
    parts = [note("Score = predicted probability that a cell is sensitive: its ln IC50 would be at or below the "
                  "drug's threshold among the bulk cell lines the model was trained on. No labelled single-cell "
                  "drug response was available to check these scores on real cells.")]
    parts.append(table([(d, f"{m['mean']:.3f}", f"{m['fraction_sensitive']:.3f}", _threshold(settings, d))
                        for d, m in metrics.items()],
                       header=("drug", "mean score", "cells with score > 0.5", "ln IC50 threshold")))
    group_key = group_key if group_key in adata.obs else next(
        (k for k in ("scfm_cell_type", "batch") if k in adata.obs), None)
    if group_key is not None:
        groups = adata.obs[group_key].astype(str)
        by_group = scores.groupby(groups.to_numpy()).mean()
        by_group.columns = list(columns)
        for drug in columns:
            metrics[drug]["by_group"] = {str(g): float(v) for g, v in by_group[drug].items()}
        counts = groups.value_counts()
        parts.append(f"<h3>Mean score per {group_key}</h3>")
        parts.append(table([(g, int(counts[g]), *(f"{v:.3f}" for v in row)) for g, row in by_group.iterrows()],
                           header=(group_key, "cells", *columns)))
    parts.append(img_tag(sensitivity_histogram_png(scores.set_axis(list(columns), axis=1)), "score histograms"))
    for drug, column in columns.items():
        parts.append(f"<h3>{drug}</h3>")
        parts.append(img_tag(plots.umap_pair_png(coords, pd.Series(scores[column].to_numpy(), index=adata.obs_names),
                                                 f"{drug} sensitivity", seed=seed), f"{drug} sensitivity"))
    return "\n".join(parts), metrics


def _threshold(settings: dict, drug: str) -> str:
    value = settings.get("thresholds", {}).get(drug) if isinstance(settings, dict) else None
    return "?" if value is None else f"{float(value):.3f}"
