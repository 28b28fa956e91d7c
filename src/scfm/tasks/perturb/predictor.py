"""A trained predictor: network + genes + control mean, its directory format, and how it is fitted.

    build_graphs(screen, prior_paths, ...) -> (gene graph, perturbation graph)
    fit_predictor(screen, names, features, graphs, ...) -> Predictor
    Predictor.predict_change(target_sets) -> (n, genes)
    Predictor.save(directory) / Predictor.load(directory)

Predictor directory: ``predictor.json`` (genes, settings, training perturbations and their targets,
provenance), ``predictor.safetensors`` (network weights, gene features, control mean),
``gene_graph.tsv`` and ``perturbation_graph.tsv`` (the edges used, ``source, target, weight``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from scfm.errors import ScfmError
from scfm.tasks.perturb import graph as G
from scfm.tasks.perturb.data import Screen, parse_targets
from scfm.tasks.perturb.model import FitSettings, NetConfig, PerturbNet, fit, predict

CONFIG_FILE = "predictor.json"
WEIGHTS_FILE = "predictor.safetensors"
GENE_GRAPH_FILE = "gene_graph.tsv"
PERT_GRAPH_FILE = "perturbation_graph.tsv"


def build_graphs(screen: Screen, prior_paths: Sequence[str | Path] = (), *, coexpression: bool = True,
                 threshold: float = 0.4, k: int = 20) -> tuple[G.GeneGraph, G.GeneGraph]:
    """(gene graph, perturbation graph). Genes: co-expression of control cells (else the prior).
    Perturbations: the prior when one is given (GEARS propagates over GO), else co-expression."""
    genes = screen.node_genes
    priors = [G.read_edge_table(p, genes) for p in prior_paths]
    prior = G.combine(priors)
    coexp = (G.coexpression_graph(screen.control, genes, n_genes=len(screen.genes), threshold=threshold, k=k)
             if coexpression else None)
    empty = G.GeneGraph(list(genes), np.zeros((0, 2), np.int64), np.zeros(0, np.float32), "none")
    gene_graph = coexp or prior or empty
    pert_graph = prior or coexp or empty
    return gene_graph, pert_graph


def bootstrap_changes(screen: Screen, names: Sequence[str], n_replicates: int, seed: int) -> np.ndarray:
    """(len(names), n_replicates, genes): means of cells drawn with replacement, minus the control mean."""
    rng = np.random.default_rng(seed)
    control = screen.control_mean
    out = np.empty((len(names), n_replicates, len(screen.genes)))
    for i, name in enumerate(names):
        cells = screen.cells[name]
        n = cells.shape[0]
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_replicates) / n   # (R, n)
        out[i] = np.asarray(cells.T @ weights.T).T - control
    return out


@dataclass
class Predictor:
    net: PerturbNet
    genes: list[str]                      # node genes; the first n_outputs are scored
    n_outputs: int
    control_mean: np.ndarray
    trained: dict[str, tuple[str, ...]]   # training perturbation -> targets
    settings: dict = field(default_factory=dict)
    gene_graph: G.GeneGraph | None = None
    pert_graph: G.GeneGraph | None = None

    @property
    def scored_genes(self) -> list[str]:
        return self.genes[: self.n_outputs]

    @property
    def trained_genes(self) -> set[str]:
        return {g for t in self.trained.values() for g in t}

    def nodes_of(self, target_sets: Sequence[Sequence[str]], path=None) -> list[list[int]]:
        index = {g: i for i, g in enumerate(self.genes)}
        missing = sorted({g for t in target_sets for g in t if g not in index})
        if missing:
            raise ScfmError(f"perturbed gene(s) {', '.join(missing[:10])} are not among the predictor's "
                            f"{len(self.genes)} genes (its scored genes and the perturbed genes of its "
                            "training data): no embedding to predict from", path)
        return [[index[g] for g in t] for t in target_sets]

    def predict_change(self, target_sets: Sequence[Sequence[str]], path=None) -> np.ndarray:
        return predict(self.net, self.nodes_of(target_sets, path))

    # ------------------------------------------------------------------------------ files
    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        state["control_mean"] = torch.as_tensor(self.control_mean, dtype=torch.float64)
        save_file(state, str(directory / WEIGHTS_FILE))
        meta = {"net": self.net.config.to_dict(), "genes": self.genes, "n_outputs": self.n_outputs,
                "trained": {k: list(v) for k, v in self.trained.items()}, "settings": self.settings}
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        self.gene_graph.to_frame().to_csv(directory / GENE_GRAPH_FILE, sep="\t", index=False)
        self.pert_graph.to_frame().to_csv(directory / PERT_GRAPH_FILE, sep="\t", index=False)

    @classmethod
    def load(cls, directory) -> "Predictor":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file() or not (directory / WEIGHTS_FILE).is_file():
            raise ScfmError(f"not a predictor directory (expected {CONFIG_FILE} and {WEIGHTS_FILE}; "
                            "run scfm perturb train)", directory)
        try:
            meta = json.loads((directory / CONFIG_FILE).read_text())
            state = load_file(str(directory / WEIGHTS_FILE))
            config = NetConfig(**meta["net"])
            genes = [str(g) for g in meta["genes"]]
            tables = [pd.read_csv(directory / name, sep="\t", dtype={"source": str, "target": str})
                      for name in (GENE_GRAPH_FILE, PERT_GRAPH_FILE)]
            graphs = [G.graph_from_edges(genes, table, source=name)
                      for table, name in zip(tables, (GENE_GRAPH_FILE, PERT_GRAPH_FILE))]
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise ScfmError(f"cannot read the predictor ({type(exc).__name__}: {exc})", directory) from exc
        features = None
        if config.feature_dim is not None:
            features = np.zeros((config.n_nodes, config.feature_dim), np.float32)
        net = PerturbNet(config, G.normalised_adjacency(graphs[0]), G.normalised_adjacency(graphs[1]), features)
        net_state = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        try:
            net.load_state_dict(net_state, strict=True)
        except RuntimeError as exc:
            raise ScfmError(f"the predictor's weights do not match its config ({exc})", directory) from exc
        net.eval()
        return cls(net, genes, int(meta["n_outputs"]), state["control_mean"].numpy(),
                   {k: tuple(v) for k, v in meta["trained"].items()}, meta.get("settings", {}), *graphs)


def fit_predictor(screen: Screen, names: Sequence[str], features: np.ndarray | None,
                  graphs: tuple[G.GeneGraph, G.GeneGraph], fit_settings: FitSettings, *, hidden: int = 64,
                  n_replicates: int = 32, seed: int = 0, progress=None, settings: dict | None = None
                  ) -> tuple[Predictor, list[float]]:
    """Train a predictor on the perturbations ``names`` of ``screen``; returns it and its loss curve."""
    genes = screen.node_genes
    index = {g: i for i, g in enumerate(genes)}
    config = NetConfig(n_nodes=len(genes), n_outputs=len(screen.genes),
                       feature_dim=None if features is None else int(features.shape[1]), hidden=hidden,
                       cross_hidden=hidden)
    torch.manual_seed(seed)
    net = PerturbNet(config, G.normalised_adjacency(graphs[0]), G.normalised_adjacency(graphs[1]), features)
    perturbations = [[index[g] for g in screen.targets[n]] for n in names]
    targets = bootstrap_changes(screen, names, n_replicates, seed)
    net.start_from(targets.mean(axis=(0, 1)))
    losses = fit(net, perturbations, targets, fit_settings, seed=seed, progress=progress)
    predictor = Predictor(net, list(genes), len(screen.genes), screen.control_mean,
                          {n: screen.targets[n] for n in names}, dict(settings or {}), *graphs)
    return predictor, losses


def targets_of_names(names: Sequence[str], separator: str = "+") -> list[tuple[str, ...]]:
    sets = [parse_targets(n, separator) for n in names]
    empty = [n for n, t in zip(names, sets) if not t]
    if empty:
        raise ScfmError(f"perturbation(s) {', '.join(empty[:5])} name no gene (expected GENE or GENE+GENE)")
    return sets
