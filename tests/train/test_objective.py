"""The read-depth-aware masking objective, on real PBMC counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm.errors import ScfmError
from scfm.train.objective import (
    ObjectiveConfig,
    binomial_thin,
    make_batch,
    make_example,
    masked_mse,
    step_generator,
)


def _cells(pbmc_counts, n=64):
    X = pbmc_counts.X[:n].tocsr()
    totals = np.asarray(pbmc_counts.obs["n_counts_whole_cell"])[:n]
    return [
        {"gene_ids": X.indices[X.indptr[i]:X.indptr[i + 1]].astype(np.int32),
         "counts": X.data[X.indptr[i]:X.indptr[i + 1]].astype(np.float32),
         "total_counts": float(totals[i])}
        for i in range(n)
    ]


def test_ratios_of_targets_and_80_10_10_split(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 200), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=0.0)
    batch = make_batch(cells, n_genes, config, step_generator(0, 0))
    original = torch.stack([torch.from_numpy(np.bincount(c["gene_ids"], minlength=n_genes) > 0) for c in cells])
    nonzero_targets = (batch.loss_mask & original).sum().item() / original.sum().item()
    zero_targets = (batch.loss_mask & ~original).sum().item() / (~original).sum().item()
    assert abs(nonzero_targets - 0.3) < 0.02
    assert abs(zero_targets - 0.03) < 0.01
    hidden_share = batch.hidden.sum().item() / batch.loss_mask.sum().item()
    assert abs(hidden_share - 0.8) < 0.03
    assert not (batch.hidden & ~batch.loss_mask).any()
    # hidden positions carry no value; unscored positions carry the truth when the cell is not thinned
    assert (batch.values[batch.hidden] == 0).all()
    assert torch.equal(batch.values[~batch.loss_mask], batch.target[~batch.loss_mask])
    # of the scored, not hidden: about half keep their value, half got another gene's
    visible_targets = batch.loss_mask & ~batch.hidden
    kept = (batch.values[visible_targets] == batch.target[visible_targets]).float().mean().item()
    assert 0.35 < kept < 0.7
    assert torch.allclose(batch.source_depth, batch.target_depth)


def test_downsampling_thins_input_but_not_target(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 50), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=1.0, downsample_range=(0.2, 0.2), mask_ratio=0.0, zero_mask_ratio=0.0)
    batch = make_batch(cells, n_genes, config, step_generator(1, 0))
    expected_t = torch.tensor([np.log10(c["total_counts"]) for c in cells], dtype=torch.float32)
    assert torch.allclose(batch.target_depth, expected_t)
    depth_drop = (batch.target_depth - batch.source_depth).numpy()
    assert np.allclose(depth_drop, -np.log10(0.2), atol=0.05)  # S ≈ T + log10(0.2)
    assert ((batch.values > 0).sum(1) < (batch.target > 0).sum(1)).all()
    # the target is the un-thinned normalised profile
    c = cells[0]
    want = np.log1p(c["counts"] / c["total_counts"] * 1e4)
    assert np.allclose(batch.target[0, c["gene_ids"]].numpy(), want, rtol=1e-6)


def test_binomial_thinning_keeps_the_expected_fraction():
    rng = np.random.default_rng(0)
    counts = np.full(10_000, 10.0, dtype=np.float32)
    thinned = binomial_thin(counts, 0.3, rng)
    assert (thinned <= counts).all()
    assert abs(thinned.sum() / counts.sum() - 0.3) < 0.01


def test_same_step_same_examples_other_step_other_examples(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 16), pbmc_counts.n_vars
    config = ObjectiveConfig()
    a = make_batch(cells, n_genes, config, step_generator(7, 3, rank=1))
    b = make_batch(cells, n_genes, config, step_generator(7, 3, rank=1))
    c = make_batch(cells, n_genes, config, step_generator(7, 4, rank=1))
    assert torch.equal(a.values, b.values) and torch.equal(a.loss_mask, b.loss_mask)
    assert not torch.equal(a.loss_mask, c.loss_mask)


def test_masked_mse_scores_only_masked_positions():
    target = torch.zeros(2, 5)
    prediction = torch.tensor([[1.0, 2.0, 0.0, 0.0, 9.0], [0.0, 0.0, 3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False, False, False], [False, False, True, False, False]])
    assert masked_mse(prediction, target, mask).item() == pytest.approx((1 + 4 + 9) / 3)
    assert masked_mse(prediction, target, torch.zeros_like(mask)).item() == 0.0


def test_zero_genes_given_a_random_value_come_from_the_cell(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 8), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=0.0, mask_token_prob=0.0, random_token_prob=1.0, zero_mask_ratio=0.5)
    example = make_example(cells[0]["gene_ids"], cells[0]["counts"], cells[0]["total_counts"], n_genes, config,
                           step_generator(0, 0))
    randomised = example.loss_mask & (example.target == 0)
    assert randomised.any()
    own_values = set(np.round(example.target[example.target > 0], 6))
    assert set(np.round(example.values[randomised], 6)) <= own_values


@pytest.mark.parametrize("field, value", [("mask_ratio", 1.5), ("downsample_range", (0.5, 0.2)),
                                          ("mask_token_prob", -0.1)])
def test_bad_ratios_are_refused(field, value):
    with pytest.raises(ScfmError, match=field.split("_")[0]):
        ObjectiveConfig(**{field: value})
