"""Does pretraining learn the right thing? Short real training runs on synthetic cells of known structure.

Every cell comes from one of four expression programs (cell types: shared baseline rates, each type
with its own highly expressed markers and silenced genes) and is sequenced at a random depth
(multinomial counts). What a model can know about a masked gene is then clear: its type's rate, read
from the other genes. The runs use the pretraining code itself (``make_batch``, ``pretraining_loss``,
the recipe's AdamW groups, warmup + cosine, clipping, redraws), in-process and without DeepSpeed so
that they fit in CI.

- A model must beat the per-gene mean (what a model that ignores the cell predicts) on held-out
  cells by a wide margin, with the default objective.
- Depth: cells thinned to a fifth of their counts are given back with T = S (the depth they have)
  and with T above it. A depth-aware model predicts more expression at the genes the shallow input
  missed when asked for a deeper profile, and at the original depth its prediction is closer to the
  un-thinned profile than a copy of the thinned input is (and than its own prediction at T = S).
  This run scores 30 % of the zero genes (the masking the paper's text gives) instead of the
  released 3 %: with 3 % the few scored zeros carry little of the loss, and a run this short learns
  the cell's composition but not yet to use T (measured: predictions moved by < 0.07 between
  T = S and T = S + 1.4 after 1,500 steps; see bench/RESULTS.md, "What the model learns").
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfm.model import inputs as I
from scfm.model.config import ModelConfig
from scfm.model.xtrimogene import XTrimoGene
from scfm.train.distributed import WarmupCosine, adamw_param_groups
from scfm.train.objective import ObjectiveConfig, make_batch, masked_mse, step_generator
from scfm.train.pretrain import FeatureRedraw, pretraining_loss

N_GENES, N_TYPES, BATCH = 120, 4, 16


def programs(rng: np.random.Generator) -> np.ndarray:
    """(types, genes) expression proportions: shared baseline, per-type markers and silenced genes."""
    baseline = rng.gamma(0.4, 1.0, N_GENES)
    rows = []
    for _ in range(N_TYPES):
        rates = baseline.copy()
        markers = rng.choice(N_GENES, N_GENES // 8, replace=False)
        rates[markers] *= rng.gamma(4.0, 2.0, markers.size)
        rates[rng.choice(N_GENES, N_GENES // 8, replace=False)] *= 0.05
        rows.append(rates / rates.sum())
    return np.stack(rows)


def sample_cells(proportions: np.ndarray, n: int, seed: int, log10_depth=(2.8, 4.5)) -> list[dict]:
    rng = np.random.default_rng(seed)
    cells = []
    for _ in range(n):
        depth = int(10 ** rng.uniform(*log10_depth))
        counts = rng.multinomial(depth, proportions[rng.integers(N_TYPES)])
        ids = np.flatnonzero(counts)
        cells.append({"gene_ids": ids.astype(np.int32), "counts": counts[ids].astype(np.float32),
                      "total_counts": float(depth)})
    return cells


def train(cells: list[dict], objective: ObjectiveConfig, steps: int, lr: float = 2e-3, seed: int = 0):
    """The pretraining step as ``scfm pretrain`` takes it, without DeepSpeed; returns the model in eval mode."""
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", n_genes=N_GENES).replace(dropout=0.1)
    model = XTrimoGene(config, seed=seed)
    optimizer = torch.optim.AdamW(adamw_param_groups(model, 0.0), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps // 10, steps))
    redraw = FeatureRedraw(200, seed)
    model.train()
    for step in range(steps):
        first = (step * BATCH) % len(cells)
        batch = make_batch(cells[first : first + BATCH], N_GENES, objective, step_generator(seed, step), config)
        redraw.before_micro_step(model, step)
        loss = pretraining_loss(model, batch, torch.float32, "cpu")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
    return model.eval()


@pytest.fixture(scope="module")
def cell_data():
    proportions = programs(np.random.default_rng(0))
    return sample_cells(proportions, 2000, seed=1), sample_cells(proportions, 200, seed=2)


def held_out_loss(model, cells, objective, mean_profile=None) -> float:
    """The objective's masked MSE on ``cells`` (fixed draws); ``mean_profile`` replaces the model if given."""
    rng = np.random.default_rng(5)
    total, weight = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(cells), 50):
            batch = make_batch(cells[start : start + 50], N_GENES, objective, rng, model.config)
            if mean_profile is None:
                prediction = model(batch.inputs, batch.positions)
            else:
                prediction = torch.from_numpy(mean_profile[batch.positions[:, 1].numpy()])
            total += float(masked_mse(prediction, batch.targets)) * batch.targets.numel()
            weight += batch.targets.numel()
    return total / weight


def normalised(cells) -> np.ndarray:
    profile = np.zeros((len(cells), N_GENES), np.float32)
    for row, cell in enumerate(cells):
        profile[row, cell["gene_ids"]] = np.log1p(cell["counts"] / cell["total_counts"] * 1e4)
    return profile


def test_beats_the_per_gene_mean_on_held_out_cells(cell_data):
    train_cells, test_cells = cell_data
    objective = ObjectiveConfig()  # the released recipe's masking and the paper's down-sampling
    model = train(train_cells, objective, steps=600)
    mean_profile = normalised(train_cells).mean(axis=0)
    learned = held_out_loss(model, test_cells, objective)
    ignoring_the_cell = held_out_loss(model, test_cells, objective, mean_profile)
    assert learned < 0.6 * ignoring_the_cell, (learned, ignoring_the_cell)


@pytest.fixture(scope="module")
def depth_model(cell_data):
    return train(cell_data[0], ObjectiveConfig(zero_mask_ratio=0.3), steps=1500)


def thinned_predictions(model, cells, added_depths, keep=0.2):
    """Cells thinned to ``keep`` of their counts, predicted at T = S + each added depth (log10)."""
    rng = np.random.default_rng(9)
    original = normalised(cells)
    full = np.zeros((len(cells), N_GENES), np.float32)
    for row, cell in enumerate(cells):
        full[row, cell["gene_ids"]] = cell["counts"]
    thinned = sp.csr_matrix(rng.binomial(full.astype(np.int64), keep).astype(np.float32))
    norm, totals = I.normalize_counts(thinned)
    predictions = {}
    with torch.no_grad():
        for added in added_depths:
            target, source = I.depth_tokens(totals, f"a{added}")
            predictions[added] = model(I.decoder_batch_from_csr(norm, target, source, model.config))[:, :N_GENES].numpy()
    return norm.toarray(), original, predictions


def test_predictions_follow_the_requested_depth(depth_model, cell_data):
    thinned, _, predictions = thinned_predictions(depth_model, cell_data[1], (0.0, 0.5, 1.0))
    missed = thinned == 0
    at_missed = [float(predictions[a][missed].mean()) for a in (0.0, 0.5, 1.0)]
    assert at_missed[0] + 0.02 < at_missed[1] < at_missed[2] - 0.02, at_missed


def test_thinned_cells_are_restored_better_than_copied(depth_model, cell_data):
    keep = 0.2
    thinned, original, predictions = thinned_predictions(depth_model, cell_data[1], (0.0, -np.log10(keep)), keep)
    copy_error = float(np.mean((thinned - original) ** 2))
    same_depth_error = float(np.mean((predictions[0.0] - original) ** 2))
    restored_error = float(np.mean((predictions[-np.log10(keep)] - original) ** 2))
    assert restored_error < 0.6 * copy_error, (restored_error, copy_error)
    assert restored_error < same_depth_error, (restored_error, same_depth_error)
