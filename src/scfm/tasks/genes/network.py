"""TF -> target edges ranked by gene-embedding similarity.

    tfs = load_tf_list("lambert2018_human_tfs.txt")                # one symbol a line
    present = match_tfs(tfs, genes)                                # gene indices of the TFs in the data
    scores = tf_target_scores(embeddings, present)                 # TFs x genes cosine (centred), self = NaN
    edges = edge_table(genes, present, scores, top_targets=100, style="arboreto")

Edge files follow one of two conventions, chosen by ``style``:

- ``arboreto``: columns ``TF``, ``target``, ``importance`` — the adjacency table GRNBoost2/GENIE3 write and
  pySCENIC reads (``pyscenic ctx``, ``modules_from_adjacencies``). Only edges with a positive score are
  written, since those tools read importance as non-negative.
- ``decoupler``: columns ``source``, ``target``, ``weight`` — decoupler's network format; negative
  similarities are kept as negative weights.

Rows are sorted by decreasing score (ties by TF, then target name), tab-separated.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from scfm.errors import ScfmError
from scfm.tasks.genes.modules import centre, cosine_similarity

EDGE_STYLES = {"arboreto": ("TF", "target", "importance"), "decoupler": ("source", "target", "weight")}


def load_tf_list(path: str | os.PathLike) -> list[str]:
    """Gene symbols, one a line (blank lines and ``#`` comments ignored), first occurrence kept."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ScfmError(f"cannot read the TF list ({exc})", path) from exc
    names = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ScfmError("the TF list is empty (expected one gene symbol a line)", path)
    if any(len(n.split()) > 1 for n in names):
        raise ScfmError("the TF list must hold one gene symbol a line (found a line with several words)", path)
    return names


def match_tfs(tfs: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """Indices into ``genes`` of the TFs present, matching symbols case-insensitively, in TF-list order."""
    where = {}
    for index, gene in enumerate(map(str, genes)):
        where.setdefault(gene.upper(), index)
    found = [where[t.upper()] for t in tfs if t.upper() in where]
    return np.array(list(dict.fromkeys(found)), dtype=np.int64)


def tf_target_scores(embeddings: np.ndarray, tf_indices: np.ndarray, *, centred: bool = True) -> np.ndarray:
    """TFs x genes cosine similarity of (centred) gene embeddings; a TF's score with itself is NaN."""
    vectors = centre(embeddings) if centred else np.asarray(embeddings, dtype=np.float32)
    scores = cosine_similarity(vectors, tf_indices).astype(np.float64)
    scores[np.arange(len(tf_indices)), tf_indices] = np.nan
    return scores


def edge_table(genes: Sequence[str], tf_indices: np.ndarray, scores: np.ndarray, *,
               top_targets: int | None = None, style: str = "arboreto") -> pd.DataFrame:
    """Edges from a TFs x genes score matrix: each TF's ``top_targets`` best targets (all when None)."""
    if style not in EDGE_STYLES:
        raise ScfmError(f"unknown edge style {style!r} (choose from {', '.join(EDGE_STYLES)})")
    names = np.asarray(list(map(str, genes)), dtype=object)
    tf_column, target_column, score_column = EDGE_STYLES[style]
    frames = []
    for row, tf in enumerate(tf_indices):
        values = scores[row]
        keep = np.flatnonzero(np.isfinite(values) & ((values > 0) if style == "arboreto" else True))
        keep = keep[np.lexsort((names[keep], -values[keep]))]
        if top_targets is not None:
            keep = keep[:top_targets]
        frames.append(pd.DataFrame({tf_column: names[tf], target_column: names[keep], score_column: values[keep]}))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(EDGE_STYLES[style]))
    order = np.lexsort((table[target_column].to_numpy(dtype=str), table[tf_column].to_numpy(dtype=str),
                        -table[score_column].to_numpy(dtype=float)))
    return table.iloc[order].reset_index(drop=True)
