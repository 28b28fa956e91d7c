"""Read-depth-aware masked regression: the pretraining objective.

One training example is built from one cell's raw counts, in five steps. Every ratio below is a field
of :class:`ObjectiveConfig`, so the CLI can change it.

1. **Down-sample** (the scFoundation paper's hierarchical scheme, see below): a cell whose original
   total is at least ``downsample_min_total`` (1,000 counts) is thinned with probability
   ``downsample_prob`` (0.5); when it is, the fraction of molecules it keeps is drawn from
   ``Beta(*downsample_beta)`` (Beta(2, 2): mean 0.5, most draws between 0.2 and 0.8, rarely below
   0.1) and every count is binomially thinned with that fraction. Binomial thinning is what
   sequencing a library less deeply does to every molecule, so the thinned cell is a plausible
   shallower measurement of the same cell. Shallower cells are never thinned: too little would be
   left to learn from (a draw that leaves no count in the vocabulary keeps the cell as it was).
   Counts outside the vocabulary (``total_counts`` minus the vocabulary counts) are thinned too, so
   that the input total stays an honest library size.
2. **Depth tokens**: ``S = log10(input total)`` (after thinning) and ``T = log10(original total)``.
   The model sees both, so it learns to predict the profile at depth T from a measurement at depth
   S; at inference T > S asks it to enhance read depth. Without thinning S == T.
3. **Normalise**: ``log1p(count / total * normalize_total)`` with each profile divided by its own
   total — the input by S's total, the target (the original, un-thinned cell) by T's total.
4. **Mask**: ``mask_ratio`` (default 0.3) of the input's nonzero genes and ``zero_mask_ratio``
   (default 0.03) of its zero genes become *targets*. Zeros are scored too, or the model would never
   learn to predict dropouts; far fewer are picked because most genes are zero. Of the targets,
   ``mask_token_prob`` (0.8) are hidden behind the mask token, ``random_token_prob`` (0.1) get the
   value of another nonzero gene of the same cell (a realistic wrong value), and the rest keep their
   value — BERT's 80/10/10, which stops the encoder from trusting that every visible value is right.
5. **Encoder/decoder split**: hidden genes and zero genes stay out of the encoder (the xTrimoGene
   asymmetry: the encoder only processes the few nonzero, visible genes); the decoder sees every
   gene. A zero gene given a random value is no longer zero, so it enters the encoder like any
   nonzero gene.

The loss is the mean squared error between prediction and the original normalised profile over the
target positions of the whole batch. A target picked among the input's zeros may be nonzero in the
original cell (the thinning lost it): that is what teaches the model to restore depth.

Everything is kept sparse: an example lists the cell's nonzero genes and its targets, never a dense
vector over the vocabulary, so building a batch costs O(nonzero genes) per cell and the zero
targets are drawn by rank among the zero genes without listing them.

The down-sampling scheme. The paper's Methods (Hao et al., Nature Methods 2024, "RDA pretraining
task") say that each raw profile is turned into its input by a hierarchical Bayesian down-sampling,
either a lower-total-count variant or the profile unchanged, and defer the details to their
Supplementary Note 9. In our words: a coin decides whether a cell is down-sampled at all; if so, a
keep-rate is drawn from a Beta prior and each molecule survives with that rate; cells below a total
count of 1,000 always stay as they are. The supplementary note itself is not part of the public text
we could read; the Bernoulli(0.5) / Beta(2, 2) / 1,000-count values are the ones a public
reimplementation citing the paper uses (``rda_downsample`` in IBM's biomed-multi-omic) and agree
with the paper's evaluation, which thins only cells above 1,000 counts. With Beta(2, 2) the depth
gap ``T - S = -log10(keep-rate)`` of a thinned cell has median 0.30, 95th percentile 0.87 and 99th
percentile 1.23 (a 17-fold shallower input); half of the cells are not thinned (T - S = 0).

Every random choice draws from one :class:`numpy.random.Generator` per training step, seeded from
``(seed, step, rank)``: a resumed run rebuilds the very same examples, so its loss curve is the
uninterrupted run's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from scfm.errors import ScfmError


@dataclass
class ObjectiveConfig:
    mask_ratio: float = 0.3  # fraction of the input's nonzero genes that become targets
    zero_mask_ratio: float = 0.03  # fraction of the input's zero genes that become targets
    mask_token_prob: float = 0.8  # targets hidden behind the mask token ...
    random_token_prob: float = 0.1  # ... given another gene's value; the rest keep their value
    downsample_prob: float = 0.5  # chance that a deep enough cell is thinned
    downsample_beta: tuple[float, float] = (2.0, 2.0)  # Beta prior of the fraction of counts kept
    downsample_min_total: float = 1000.0  # cells shallower than this are never thinned
    normalize_total: float = 1e4  # counts per cell after normalisation, before log1p

    def __post_init__(self):
        self.downsample_beta = tuple(float(x) for x in self.downsample_beta)
        self.validate()

    def validate(self) -> None:
        for name in ("mask_ratio", "zero_mask_ratio", "mask_token_prob", "random_token_prob", "downsample_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ScfmError(f"{name} must be between 0 and 1, got {value}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ScfmError("mask_token_prob + random_token_prob must not exceed 1")
        if len(self.downsample_beta) != 2 or not all(x > 0 for x in self.downsample_beta):
            raise ScfmError(f"downsample_beta must be two positive numbers, got {self.downsample_beta}")
        if self.downsample_min_total < 0:
            raise ScfmError("downsample_min_total must not be negative")
        if self.normalize_total <= 0:
            raise ScfmError("normalize_total must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Example:
    """One cell, sparse: the positions that carry an input value, and the scored positions."""

    gene_ids: np.ndarray  # int64 ascending: the input's nonzero genes and the zero genes picked as targets
    values: np.ndarray  # float32 normalised input at gene_ids (0 where hidden or still zero)
    hidden: np.ndarray  # bool at gene_ids: shown to the decoder as the mask token, kept from the encoder
    target_ids: np.ndarray  # int64 ascending: positions scored by the loss (hidden ⊆ targets)
    target_values: np.ndarray  # float32 normalised original (un-thinned) profile at target_ids
    source_depth: float  # S = log10(input total)
    target_depth: float  # T = log10(original total)


@dataclass
class Batch:
    """Examples for one micro-batch: the model's inputs and the loss targets (torch tensors, CPU)."""

    inputs: "PretrainBatch"  # scfm.model.inputs.PretrainBatch
    positions: torch.Tensor  # (N, 2) long: (cell, position) of every scored target
    targets: torch.Tensor  # (N,) float32: the original normalised profile there
    source_depth: torch.Tensor  # (B,) float32
    target_depth: torch.Tensor  # (B,) float32

    def __len__(self) -> int:
        return self.source_depth.shape[0]


def step_generator(seed: int, step: int, rank: int = 0) -> np.random.Generator:
    """The generator for one training step on one rank; the same triple always gives the same draws."""
    return np.random.default_rng([int(seed), int(step), int(rank)])


def binomial_thin(counts: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Keep each molecule independently with probability ``fraction``."""
    integer = np.rint(np.asarray(counts, dtype=np.float64)).astype(np.int64)
    return rng.binomial(integer, fraction).astype(np.float32)


def log_normalise(counts: np.ndarray, total: float, normalize_total: float) -> np.ndarray:
    scale = normalize_total / max(float(total), 1.0)
    return np.log1p(np.asarray(counts, dtype=np.float32) * np.float32(scale)).astype(np.float32)


def downsample(counts: np.ndarray, total: float, config: ObjectiveConfig, rng: np.random.Generator
               ) -> tuple[np.ndarray, float]:
    """(input counts, input total): the cell thinned per the scheme above, or as it was."""
    if total < config.downsample_min_total or rng.random() >= config.downsample_prob:
        return counts, total
    keep = rng.beta(*config.downsample_beta)
    thinned = binomial_thin(counts, keep, rng)
    if not thinned.any():
        return counts, total
    outside_vocab = total - float(counts.sum())
    thinned_outside = float(rng.binomial(int(round(outside_vocab)), keep)) if outside_vocab >= 1 else 0.0
    return thinned, max(float(thinned.sum()) + thinned_outside, 1.0)


def make_example(
    gene_ids: np.ndarray,
    counts: np.ndarray,
    total_counts: float,
    n_genes: int,
    config: ObjectiveConfig,
    rng: np.random.Generator,
) -> Example:
    """Build one masked, possibly thinned training example from a cell's nonzero counts."""
    gene_ids = np.asarray(gene_ids, dtype=np.int64)
    counts = np.asarray(counts, dtype=np.float32)
    if np.any(np.diff(gene_ids) < 0):  # shards store them ascending; other callers may not
        order = np.argsort(gene_ids, kind="stable")
        gene_ids, counts = gene_ids[order], counts[order]
    original_total = max(float(total_counts), float(counts.sum()), 1.0)
    input_counts, input_total = downsample(counts, original_total, config, rng)

    original = log_normalise(counts, original_total, config.normalize_total)
    present = input_counts > 0
    nonzero = gene_ids[present]  # the input's nonzero genes, ascending
    nonzero_values = log_normalise(input_counts[present], input_total, config.normalize_total)

    value_targets = _choose(nonzero.size, config.mask_ratio, rng)  # ranks among nonzero genes
    zero_targets = _zero_positions(nonzero, _choose(n_genes - nonzero.size, config.zero_mask_ratio, rng))
    ids = np.concatenate([nonzero, zero_targets])
    values = np.concatenate([nonzero_values, np.zeros(zero_targets.size, np.float32)])
    targets = np.concatenate([value_targets, nonzero.size + np.arange(zero_targets.size)])  # indices into ids

    # 80/10/10: one uniform draw per target decides its fate
    fate = rng.random(targets.size)
    hidden_idx = targets[fate < config.mask_token_prob]
    random_idx = targets[(fate >= config.mask_token_prob) & (fate < config.mask_token_prob + config.random_token_prob)]
    if random_idx.size and nonzero.size:
        values[random_idx] = nonzero_values[rng.integers(0, nonzero.size, size=random_idx.size)]
    hidden = np.zeros(ids.size, dtype=bool)
    hidden[hidden_idx] = True
    values[hidden] = 0.0

    order = np.argsort(ids, kind="stable")
    target_ids = np.sort(ids[targets])
    target_values = np.zeros(target_ids.size, dtype=np.float32)  # zero where the original cell has no count
    if gene_ids.size:
        where = np.searchsorted(gene_ids, target_ids).clip(max=gene_ids.size - 1)
        found = gene_ids[where] == target_ids
        target_values[found] = original[where[found]]
    return Example(
        gene_ids=ids[order],
        values=values[order],
        hidden=hidden[order],
        target_ids=target_ids,
        target_values=target_values,
        source_depth=float(np.log10(input_total)),
        target_depth=float(np.log10(original_total)),
    )


def _choose(n: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``round(ratio * n)`` distinct ranks out of ``n``, ascending (at least one when ratio > 0 and n > 0)."""
    if ratio <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    k = min(n, max(1, int(round(ratio * n))))
    return np.sort(rng.choice(n, size=k, replace=False)).astype(np.int64)


def _zero_positions(nonzero: np.ndarray, ranks: np.ndarray) -> np.ndarray:
    """The vocabulary positions of the zero genes with these ranks (0 = the first zero gene).

    ``nonzero[i] - i`` zero genes come before the i-th nonzero gene, so a zero gene of rank r sits
    after every nonzero gene whose count of preceding zeros is at most r.
    """
    zeros_before = nonzero - np.arange(nonzero.size)
    return ranks + np.searchsorted(zeros_before, ranks, side="right")


def make_batch(cells: list[dict], n_genes: int, config: ObjectiveConfig, rng: np.random.Generator,
               model_config=None) -> Batch:
    """Examples for a list of shard records (``gene_ids``, ``counts``, ``total_counts``), collated.

    ``model_config``: the model's :class:`~scfm.model.config.ModelConfig` (default: the ``tiny``
    preset's token layout for ``n_genes``; only the layout matters here).
    """
    examples = [
        make_example(c["gene_ids"], c["counts"], float(c["total_counts"]), n_genes, config, rng) for c in cells
    ]
    return collate(examples, model_config or _layout(n_genes))


def _layout(n_genes: int):
    from scfm.model.config import ModelConfig

    return ModelConfig.preset("tiny", n_genes=n_genes)


def collate(examples: list[Example], model_config) -> Batch:
    from scfm.model.inputs import build_pretrain_batch

    inputs = build_pretrain_batch(
        [e.gene_ids for e in examples], [e.values for e in examples], [e.hidden for e in examples],
        [e.target_depth for e in examples], [e.source_depth for e in examples], model_config,
    )
    cells = np.repeat(np.arange(len(examples)), [e.target_ids.size for e in examples])
    positions = np.stack([cells, np.concatenate([e.target_ids for e in examples])], axis=1).astype(np.int64)
    return Batch(
        inputs=inputs,
        positions=torch.from_numpy(positions),
        targets=torch.from_numpy(np.concatenate([e.target_values for e in examples]).astype(np.float32)),
        source_depth=torch.tensor([e.source_depth for e in examples], dtype=torch.float32),
        target_depth=torch.tensor([e.target_depth for e in examples], dtype=torch.float32),
    )


def masked_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the scored positions of the whole batch (0 when none are scored)."""
    if prediction.numel() == 0:
        return prediction.sum() * 0.0
    return (prediction - target.to(prediction.dtype)).pow(2).mean()
