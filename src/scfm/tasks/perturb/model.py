"""The perturbation predictor: a GEARS-style network over genes, and its training loop.

    PerturbNet(n_nodes, n_outputs, gene_adjacency, pert_adjacency, features=None, hidden=64, ...)
    net(perturbations) -> (batch, n_outputs) predicted mean change of log1p expression
    fit(net, examples, ...) -> losses

The shape follows GEARS (Roohani et al. 2023), written for mean changes instead of single cells:
- every gene gets a base embedding (from fixed gene features through an MLP, or a learned table) plus
  one graph-convolution step of it over the co-expression graph;
- every gene also gets a perturbation embedding, propagated over the perturbation graph (a prior such as
  GO co-annotation, else co-expression), so that a gene never perturbed in training borrows from its
  neighbours and, with scfm features, from its own context embedding;
- a perturbation's embedding is the sum of its genes' perturbation embeddings through a fusion MLP
  (combinations are sums, as in GEARS), added to every gene's base embedding, plus a learned
  "this gene is perturbed" vector on the perturbed genes themselves;
- a shared MLP, then gene-specific linear decoders, then a cross-gene layer that lets every gene see
  the whole predicted change, then gene-specific output weights.
LayerNorm stands in for GEARS' BatchNorm so that a prediction does not depend on its batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from scfm.utils import one_torch_thread


@dataclass(frozen=True)
class NetConfig:
    n_nodes: int
    n_outputs: int
    feature_dim: int | None    # None: learned gene embeddings
    hidden: int = 64           # GEARS default
    cross_hidden: int = 64
    graph_mix: float = 0.2     # weight of the propagated embedding in the base embedding (GEARS: 0.2)

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(sizes: Sequence[int], last_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers += [nn.LayerNorm(b), nn.ReLU()]
    return nn.Sequential(*layers)


class PerturbNet(nn.Module):
    def __init__(self, config: NetConfig, gene_adjacency: torch.Tensor, pert_adjacency: torch.Tensor,
                 features: np.ndarray | None = None):
        super().__init__()
        self.config = config
        h, n = config.hidden, config.n_nodes
        self.register_buffer("gene_adjacency", gene_adjacency, persistent=False)
        self.register_buffer("pert_adjacency", pert_adjacency, persistent=False)
        if config.feature_dim is None:
            self.base_table = nn.Embedding(n, h)
            self.pos_table = nn.Embedding(n, h)
            self.pert_table = nn.Embedding(n, h)
        else:
            if features is None or features.shape != (n, config.feature_dim):
                raise ValueError("features of shape (n_nodes, feature_dim) are required")
            feats = torch.as_tensor(features, dtype=torch.float32)
            # features are standardised per dimension: scfm states and random features differ in scale
            feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
            self.register_buffer("features", feats)
            self.base_in = _mlp([config.feature_dim, h, h], last_activation=True)
            self.pos_in = _mlp([config.feature_dim, h, h], last_activation=True)
            self.pert_in = _mlp([config.feature_dim, h, h], last_activation=True)
        self.pos_conv = nn.Linear(h, h)
        self.pert_conv = nn.Linear(h, h)
        self.base_out = _mlp([h, h, h], last_activation=True)
        self.pert_fuse = _mlp([h, h, h], last_activation=True)
        self.perturbed_flag = nn.Linear(1, h)
        self.norm = nn.LayerNorm(h)
        self.shared = _mlp([h, 2 * h, h])
        m = config.n_outputs
        self.gene_w1 = nn.Parameter(torch.empty(m, h))
        self.gene_b1 = nn.Parameter(torch.zeros(m))
        self.cross = _mlp([m, config.cross_hidden, config.cross_hidden], last_activation=True)
        self.gene_w2 = nn.Parameter(torch.empty(m, config.cross_hidden + 1))
        self.gene_b2 = nn.Parameter(torch.zeros(m))
        nn.init.xavier_normal_(self.gene_w1)
        nn.init.xavier_normal_(self.gene_w2)

    def start_from(self, mean_change: np.ndarray) -> None:
        """Set the output bias to the mean change of the training perturbations: the network starts at the
        training-mean baseline and learns how each perturbation departs from it (with a handful of training
        perturbations, a network started at zero spends its capacity rediscovering the shared response)."""
        with torch.no_grad():
            self.gene_b2.copy_(torch.as_tensor(mean_change, dtype=torch.float32))

    # -------------------------------------------------------------------------------- embeddings
    def _tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.config.feature_dim is None:
            return self.base_table.weight, self.pos_table.weight, self.pert_table.weight
        return self.base_in(self.features), self.pos_in(self.features), self.pert_in(self.features)

    def gene_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(base embedding of every node, perturbation embedding of every node), each (n_nodes, hidden)."""
        base, pos, pert = self._tables()
        pos = torch.sparse.mm(self.gene_adjacency, self.pos_conv(pos))   # one SGConv step
        base = self.base_out(base + self.config.graph_mix * pos)
        pert = torch.sparse.mm(self.pert_adjacency, self.pert_conv(pert))
        return base, pert

    def forward(self, perturbations: Sequence[Sequence[int]]) -> torch.Tensor:
        """``perturbations``: for each item of the batch, the node indices of its perturbed genes."""
        base, pert = self.gene_states()
        batch = len(perturbations)
        n = self.config.n_nodes
        onehot = torch.zeros(batch, n)
        for row, nodes in enumerate(perturbations):
            onehot[row, list(nodes)] = 1.0
        combined = self.pert_fuse(onehot @ pert)                                   # sum, then fuse
        states = base.unsqueeze(0) + combined.unsqueeze(1)                         # (batch, n, h)
        states = states + self.perturbed_flag(onehot.unsqueeze(-1))
        states = torch.relu(self.norm(states))[:, : self.config.n_outputs]
        out = self.shared(states)                                                  # (batch, m, h)
        first = (out * self.gene_w1).sum(-1) + self.gene_b1                       # (batch, m)
        cross = self.cross(first)                                                  # (batch, c)
        joined = torch.cat([first.unsqueeze(-1), cross.unsqueeze(1).expand(-1, first.shape[1], -1)], dim=-1)
        return (joined * self.gene_w2).sum(-1) + self.gene_b2


# ------------------------------------------------------------------------------------ training
def loss_fn(predicted: torch.Tensor, observed: torch.Tensor, direction_weight: float) -> torch.Tensor:
    """MSE plus a direction penalty: relu(-predicted x observed) is zero when the signs agree and grows
    with how far a prediction sits on the wrong side (GEARS adds a sign-agreement term too)."""
    mse = ((predicted - observed) ** 2).mean()
    if direction_weight <= 0:
        return mse
    return mse + direction_weight * torch.relu(-predicted * observed).mean()


@dataclass(frozen=True)
class FitSettings:
    epochs: int = 300
    batch_size: int = 16
    lr: float = 1e-3          # GEARS default
    weight_decay: float = 5e-4  # GEARS default
    direction_weight: float = 0.1  # GEARS default for its direction term

    def to_dict(self) -> dict:
        return asdict(self)


def fit(net: PerturbNet, perturbations: list[list[int]], targets: np.ndarray, settings: FitSettings, *,
        seed: int, progress=None) -> list[float]:
    """Train on bootstrap replicates of each training perturbation's mean change.

    ``targets``: (n_perturbations, n_replicates, n_outputs); each epoch sees every perturbation once,
    with one of its replicates drawn at random, so the model meets the sampling noise of a mean and
    not a single fixed value. Returns the loss per epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimiser = torch.optim.Adam(net.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    observed = torch.as_tensor(targets, dtype=torch.float32)
    net.train()
    with one_torch_thread():
        losses = _epochs(net, optimiser, perturbations, observed, settings, generator, rng, progress)
    net.eval()
    return losses


def _epochs(net, optimiser, perturbations, observed, settings, generator, rng, progress) -> list[float]:
    n_items, n_replicates = observed.shape[:2]
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(n_items, generator=generator).numpy()
        replicate = rng.integers(0, n_replicates, size=n_items)
        total = 0.0
        for start in range(0, n_items, settings.batch_size):
            rows = order[start : start + settings.batch_size]
            predicted = net([perturbations[r] for r in rows])
            loss = loss_fn(predicted, observed[rows, replicate[rows]], settings.direction_weight)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(rows)
        losses.append(total / n_items)
        if progress is not None:
            progress.update(1)
    return losses


def predict(net: PerturbNet, perturbations: list[list[int]]) -> np.ndarray:
    net.eval()
    with torch.no_grad(), one_torch_thread():
        return net(perturbations).numpy().astype(np.float64)
