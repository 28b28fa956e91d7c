"""TF -> target edges: a planted TF programme ranks first; edge files follow the tools' conventions."""

from __future__ import annotations

import numpy as np
import pytest

from planted import planted_tf_programme
from scfm.errors import ScfmError
from scfm.tasks.genes import network as N


def test_planted_targets_rank_above_every_other_gene():
    vectors, tf, targets = planted_tf_programme(n_genes=300, n_targets=15, seed=0)
    vectors = vectors + 5.0  # a shared offset, as decoder outputs have
    scores = N.tf_target_scores(vectors, np.array([tf]))[0]
    assert np.isnan(scores[tf])
    others = np.setdiff1d(np.arange(300), np.append(targets, tf))
    assert scores[targets].min() > scores[others].max()
    names = [f"G{i}" for i in range(300)]
    edges = N.edge_table(names, np.array([tf]), scores[None, :], top_targets=15)
    assert set(edges["target"]) == {names[t] for t in targets}


def test_a_planted_programme_beats_random_ranking_by_auprc():
    from sklearn.metrics import average_precision_score

    vectors, tf, targets = planted_tf_programme(n_genes=400, n_targets=20, closeness=1.2, seed=3)
    scores = N.tf_target_scores(vectors, np.array([tf]))[0]
    truth = np.isin(np.arange(400), targets)
    keep = np.arange(400) != tf
    planted = average_precision_score(truth[keep], scores[keep])
    random = average_precision_score(truth[keep], np.random.default_rng(0).random(keep.sum()))
    assert planted > 0.8 and random < 0.2


def test_edge_styles_match_arboreto_and_decoupler():
    names = ["TF1", "A", "B", "C"]
    scores = np.array([[np.nan, 0.9, -0.4, 0.1]])
    arboreto = N.edge_table(names, np.array([0]), scores, style="arboreto")
    assert list(arboreto.columns) == ["TF", "target", "importance"]
    assert arboreto.values.tolist() == [["TF1", "A", 0.9], ["TF1", "C", 0.1]]  # importance >= 0 only
    decoupler = N.edge_table(names, np.array([0]), scores, style="decoupler")
    assert list(decoupler.columns) == ["source", "target", "weight"]
    assert decoupler["weight"].tolist() == [0.9, 0.1, -0.4]
    with pytest.raises(ScfmError, match="unknown edge style"):
        N.edge_table(names, np.array([0]), scores, style="csv")


def test_edges_sort_by_score_across_tfs():
    names = ["T1", "T2", "A", "B"]
    scores = np.array([[np.nan, 0.2, 0.5, 0.3], [0.1, np.nan, 0.9, 0.3]])
    edges = N.edge_table(names, np.array([0, 1]), scores, top_targets=2)
    assert edges.values.tolist() == [["T2", "A", 0.9], ["T1", "A", 0.5], ["T1", "B", 0.3], ["T2", "B", 0.3]]


def test_tf_list_reading_and_matching(tmp_path):
    path = tmp_path / "tfs.txt"
    path.write_text("# TFs\nSPI1\n\nirf8  # lower case\nSPI1\nGATA1\n")
    tfs = N.load_tf_list(path)
    assert tfs == ["SPI1", "irf8", "GATA1"]
    assert N.match_tfs(tfs, ["CD3E", "IRF8", "SPI1"]).tolist() == [2, 1]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ScfmError, match="empty"):
        N.load_tf_list(tmp_path / "empty.txt")
    (tmp_path / "table.txt").write_text("TF target\n")
    with pytest.raises(ScfmError, match="one gene symbol a line"):
        N.load_tf_list(tmp_path / "table.txt")
    with pytest.raises(ScfmError, match="cannot read"):
        N.load_tf_list(tmp_path / "missing.txt")


def test_the_shared_lambert_list_loads(shared_data):
    tfs = N.load_tf_list(shared_data / "lambert2018_human_tfs.txt")
    assert len(tfs) == 1639 and "SPI1" in tfs
