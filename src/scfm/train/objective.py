"""Read-depth-aware masked regression: the pretraining objective.

One training example is built from one cell's raw counts, in five steps. Every ratio below is a field
of :class:`ObjectiveConfig`, so the CLI can change it.

1. **Downsample** (``downsample_prob``, default 0.5): with that probability a cell's counts are
   binomially thinned to a fraction drawn uniformly from ``downsample_range`` (default 0.1–0.9).
   Binomial thinning is what sequencing a library less deeply does to every molecule, so the thinned
   cell is a plausible shallower measurement of the same cell. Cells whose original total is below
   ``downsample_min_total`` (default 200 counts) are never thinned: too little would be left to learn
   from. Counts outside the vocabulary (``total_counts`` minus the vocabulary counts) are thinned
   too, so that the input total stays an honest library size.
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
target positions of the whole batch.

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
    downsample_prob: float = 0.5  # chance that a cell is thinned
    downsample_range: tuple[float, float] = (0.1, 0.9)  # fraction of counts kept when thinned
    downsample_min_total: float = 200.0  # cells shallower than this are never thinned
    normalize_total: float = 1e4  # counts per cell after normalisation, before log1p

    def __post_init__(self):
        self.downsample_range = tuple(float(x) for x in self.downsample_range)
        self.validate()

    def validate(self) -> None:
        for name in ("mask_ratio", "zero_mask_ratio", "mask_token_prob", "random_token_prob", "downsample_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ScfmError(f"{name} must be between 0 and 1, got {value}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ScfmError("mask_token_prob + random_token_prob must not exceed 1")
        low, high = self.downsample_range
        if not 0.0 < low <= high <= 1.0:
            raise ScfmError(f"downsample_range must satisfy 0 < low <= high <= 1, got {self.downsample_range}")
        if self.normalize_total <= 0:
            raise ScfmError("normalize_total must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Example:
    """One cell, dense over the vocabulary (n_genes positions)."""

    values: np.ndarray  # float32[n_genes] normalised input; hidden positions hold 0 (the model masks them)
    target: np.ndarray  # float32[n_genes] normalised original profile
    hidden: np.ndarray  # bool[n_genes] shown to the decoder as the mask token, kept from the encoder
    loss_mask: np.ndarray  # bool[n_genes] positions scored by the loss (hidden ⊆ loss_mask)
    source_depth: float  # S = log10(input total)
    target_depth: float  # T = log10(original total)


@dataclass
class Batch:
    """Examples stacked along a leading batch dimension (torch tensors, CPU)."""

    values: torch.Tensor  # (B, G) float32
    target: torch.Tensor  # (B, G) float32
    hidden: torch.Tensor  # (B, G) bool
    loss_mask: torch.Tensor  # (B, G) bool
    source_depth: torch.Tensor  # (B,) float32
    target_depth: torch.Tensor  # (B,) float32

    def __len__(self) -> int:
        return self.values.shape[0]

    def to(self, device) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


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
    original_total = max(float(total_counts), float(counts.sum()), 1.0)
    outside_vocab = original_total - float(counts.sum())

    input_counts, input_total = counts, original_total
    if original_total >= config.downsample_min_total and rng.random() < config.downsample_prob:
        fraction = rng.uniform(*config.downsample_range)
        input_counts = binomial_thin(counts, fraction, rng)
        thinned_outside = float(rng.binomial(int(round(outside_vocab)), fraction)) if outside_vocab >= 1 else 0.0
        input_total = max(float(input_counts.sum()) + thinned_outside, 1.0)

    target = np.zeros(n_genes, dtype=np.float32)
    target[gene_ids] = log_normalise(counts, original_total, config.normalize_total)
    values = np.zeros(n_genes, dtype=np.float32)
    values[gene_ids] = log_normalise(input_counts, input_total, config.normalize_total)

    nonzero = np.flatnonzero(values > 0)
    zero = np.flatnonzero(values <= 0)
    targets = np.concatenate([_choose(nonzero, config.mask_ratio, rng), _choose(zero, config.zero_mask_ratio, rng)])

    # 80/10/10: one uniform draw per target decides its fate
    fate = rng.random(targets.size)
    hidden_idx = targets[fate < config.mask_token_prob]
    random_idx = targets[(fate >= config.mask_token_prob) & (fate < config.mask_token_prob + config.random_token_prob)]
    if random_idx.size and nonzero.size:
        values[random_idx] = values[rng.choice(nonzero, size=random_idx.size)]

    hidden = np.zeros(n_genes, dtype=bool)
    hidden[hidden_idx] = True
    values[hidden] = 0.0
    loss_mask = np.zeros(n_genes, dtype=bool)
    loss_mask[targets] = True
    return Example(
        values=values,
        target=target,
        hidden=hidden,
        loss_mask=loss_mask,
        source_depth=float(np.log10(input_total)),
        target_depth=float(np.log10(original_total)),
    )


def _choose(candidates: np.ndarray, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """``round(ratio * len)`` candidates without replacement (at least one when ratio > 0 and any exist)."""
    if ratio <= 0 or candidates.size == 0:
        return candidates[:0]
    k = min(candidates.size, max(1, int(round(ratio * candidates.size))))
    return np.sort(rng.choice(candidates, size=k, replace=False))


def make_batch(cells: list[dict], n_genes: int, config: ObjectiveConfig, rng: np.random.Generator) -> Batch:
    """Examples for a list of shard records (``gene_ids``, ``counts``, ``total_counts``), stacked."""
    examples = [
        make_example(c["gene_ids"], c["counts"], float(c["total_counts"]), n_genes, config, rng) for c in cells
    ]
    return stack_examples(examples)


def stack_examples(examples: list[Example]) -> Batch:
    return Batch(
        values=torch.from_numpy(np.stack([e.values for e in examples])),
        target=torch.from_numpy(np.stack([e.target for e in examples])),
        hidden=torch.from_numpy(np.stack([e.hidden for e in examples])),
        loss_mask=torch.from_numpy(np.stack([e.loss_mask for e in examples])),
        source_depth=torch.tensor([e.source_depth for e in examples], dtype=torch.float32),
        target_depth=torch.tensor([e.target_depth for e in examples], dtype=torch.float32),
    )


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the scored positions of the whole batch (0 when none are scored)."""
    mask = loss_mask.to(prediction.dtype)
    squared = (prediction - target.to(prediction.dtype)).pow(2) * mask
    return squared.sum() / mask.sum().clamp_min(1.0)
