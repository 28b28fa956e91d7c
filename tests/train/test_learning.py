"""Does pretraining learn the right thing? Short real training runs on synthetic cells of known structure.

Every cell comes from one of four expression programs (cell types: shared baseline rates, each type
with its own highly expressed markers and silenced genes) and is sequenced at a random depth
(multinomial counts, 630 to 32,000). What a model can know about a masked gene is then clear: its
type's rate, read from the other genes. The runs use the pretraining code itself (``make_batch``,
``pretraining_loss``, the recipe's AdamW groups, warmup + cosine, clipping, random-feature redraws),
in-process and without DeepSpeed so that they fit in CI.

- With the default objective, a model must beat the per-gene mean (what a model that ignores the
  cell predicts) on held-out cells by a wide margin, and restore cells thinned to a fifth of their
  counts (asked for their original depth) better than a copy of the thinned input does.
- Depth: a thinned cell at depth S looks exactly like a shallower cell (thinning a multinomial sample
  gives a multinomial sample), so only the T token says how much the input lost. A model trained on
  the depth question alone (only zero genes scored) must predict more expression at the genes the
  input missed, and a larger library, the deeper the T it is asked for. With the full objective a run
  this short does not yet use T (predictions moved by < 0.03 between T = S and T = S + 1.4 after 1,500
  steps), and with a learning rate of 2e-3 or more T is lost altogether: the encoder's second layer
  drowns the T token in its attention and feed-forward outputs. bench/RESULTS.md ("What the model
  learns") has the measurements.
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


def programs(rng: np.random.Generator, n_genes: int = N_GENES) -> np.ndarray:
    """(types, genes) expression proportions: shared baseline, per-type markers and silenced genes."""
    baseline = rng.gamma(0.4, 1.0, n_genes)
    rows = []
    for _ in range(N_TYPES):
        rates = baseline.copy()
        markers = rng.choice(n_genes, n_genes // 8, replace=False)
        rates[markers] *= rng.gamma(4.0, 2.0, markers.size)
        rates[rng.choice(n_genes, n_genes // 8, replace=False)] *= 0.05
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


def train(cells: list[dict], objective: ObjectiveConfig, steps: int, lr: float, n_genes: int = N_GENES, seed: int = 0):
    """The pretraining step as ``scfm pretrain`` takes it, without DeepSpeed; returns the model in eval mode."""
    torch.manual_seed(seed)
    config = ModelConfig.preset("tiny", n_genes=n_genes).replace(dropout=0.1)
    model = XTrimoGene(config, seed=seed)
    optimizer = torch.optim.AdamW(adamw_param_groups(model, 0.0), lr=lr, betas=(0.9, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(steps // 10, steps))
    redraw = FeatureRedraw(200, seed)
    model.train()
    for step in range(steps):
        first = (step * BATCH) % len(cells)
        batch = make_batch(cells[first : first + BATCH], n_genes, objective, step_generator(seed, step), config)
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
            batch = make_batch(cells[start : start + 50], model.config.n_genes, objective, rng, model.config)
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


@pytest.fixture(scope="module")
def default_model(cell_data):
    """The released recipe's masking and the paper's down-sampling."""
    return train(cell_data[0], ObjectiveConfig(), steps=500, lr=2e-3)


def test_beats_the_per_gene_mean_on_held_out_cells(default_model, cell_data):
    train_cells, test_cells = cell_data
    mean_profile = normalised(train_cells).mean(axis=0)
    learned = held_out_loss(default_model, test_cells, ObjectiveConfig())
    ignoring_the_cell = held_out_loss(default_model, test_cells, ObjectiveConfig(), mean_profile)
    assert learned < 0.6 * ignoring_the_cell, (learned, ignoring_the_cell)


def thinned_predictions(model, cells, added_depths, keep=0.2):
    """Cells thinned to ``keep`` of their counts, predicted at T = S + each added depth (log10)."""
    n_genes = model.config.n_genes
    rng = np.random.default_rng(9)
    full = np.zeros((len(cells), n_genes), np.float32)
    original = np.zeros_like(full)
    for row, cell in enumerate(cells):
        full[row, cell["gene_ids"]] = cell["counts"]
        original[row, cell["gene_ids"]] = np.log1p(cell["counts"] / cell["total_counts"] * 1e4)
    thinned = sp.csr_matrix(rng.binomial(full.astype(np.int64), keep).astype(np.float32))
    norm, totals = I.normalize_counts(thinned)
    predictions = {}
    with torch.no_grad():
        for added in added_depths:
            target, source = I.depth_tokens(totals, f"a{added:.4f}")
            predictions[added] = model(I.decoder_batch_from_csr(norm, target, source, model.config))[:, :n_genes].numpy()
    return norm.toarray(), original, predictions


def test_thinned_cells_are_restored_better_than_copied(default_model, cell_data):
    keep = 0.2
    deeper = float(np.log10(1 / keep))
    thinned, original, predictions = thinned_predictions(default_model, cell_data[1], (deeper,), keep)
    copy_error = float(np.mean((thinned - original) ** 2))
    restored_error = float(np.mean((predictions[deeper] - original) ** 2))
    assert restored_error < 0.7 * copy_error, (restored_error, copy_error)


DEPTH_GENES = 40


@pytest.fixture(scope="module")
def depth_cells():
    proportions = programs(np.random.default_rng(0), n_genes=DEPTH_GENES)
    return sample_cells(proportions, 2000, seed=1), sample_cells(proportions, 200, seed=2)


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~1 minute on a quiet 2-core machine; a shared one can be 20x slower
def test_predictions_follow_the_requested_depth(depth_cells):
    depth_only = ObjectiveConfig(mask_ratio=0.0, zero_mask_ratio=0.5)  # score the input's zero genes only
    model = train(depth_cells[0], depth_only, steps=2500, lr=5e-4, n_genes=DEPTH_GENES)
    added = (0.0, 0.35, 0.7)
    thinned, _, predictions = thinned_predictions(model, depth_cells[1], added)
    missed = thinned == 0
    at_missed = [float(predictions[a][missed].mean()) for a in added]
    assert at_missed[0] + 0.2 < at_missed[1] < at_missed[2] - 0.05, at_missed
    library = [float(np.expm1(predictions[a]).sum(axis=1).mean()) for a in added]  # counts per 10k, summed
    assert library[0] * 1.5 < library[1] < library[2], library
