"""The read-depth-aware masking objective, on real PBMC counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scfm.errors import ScfmError
from scfm.model.config import ModelConfig
from scfm.train.objective import (
    ObjectiveConfig,
    binomial_thin,
    downsample,
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


def _dense(example, n_genes):
    """(input values, target, hidden, scored) over the vocabulary, for checking one example."""
    values, target = np.zeros(n_genes, np.float32), np.zeros(n_genes, np.float32)
    hidden, scored = np.zeros(n_genes, bool), np.zeros(n_genes, bool)
    values[example.gene_ids], hidden[example.gene_ids] = example.values, example.hidden
    target[example.target_ids], scored[example.target_ids] = example.target_values, True
    return values, target, hidden, scored


def _original(cell, n_genes, normalize_total=1e4):
    profile = np.zeros(n_genes, np.float32)
    total = max(cell["total_counts"], float(cell["counts"].sum()))
    profile[cell["gene_ids"]] = np.log1p(cell["counts"] / total * normalize_total)
    return profile


def test_ratios_of_targets_and_80_10_10_split(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 200), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=0.0)
    rng = step_generator(0, 0)
    dense = [_dense(make_example(c["gene_ids"], c["counts"], c["total_counts"], n_genes, config, rng), n_genes)
             for c in cells]
    values, target, hidden, scored = (np.stack(x) for x in zip(*dense))
    original = np.stack([_original(c, n_genes) for c in cells])
    present = original > 0
    assert abs((scored & present).sum() / present.sum() - 0.3) < 0.02
    assert abs((scored & ~present).sum() / (~present).sum() - 0.03) < 0.01
    assert abs(hidden.sum() / scored.sum() - 0.8) < 0.03
    assert not (hidden & ~scored).any()
    # hidden positions carry no value; unscored positions carry the truth when the cell is not thinned
    assert (values[hidden] == 0).all()
    assert np.allclose(values[~scored], original[~scored], rtol=1e-6)
    assert np.allclose(target[scored], original[scored])  # the target is the cell's own profile
    # of the scored, not hidden: about half keep their value, half got another gene's
    visible_targets = scored & ~hidden
    kept = (values[visible_targets] == original[visible_targets]).mean()
    assert 0.35 < kept < 0.7
    batch = make_batch(cells, n_genes, config, step_generator(0, 0))
    assert torch.allclose(batch.source_depth, batch.target_depth)
    assert batch.positions.shape[0] == batch.targets.shape[0] == scored.sum()


def test_downsampling_thins_input_but_not_target(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 50), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=1.0, downsample_beta=(200.0, 800.0), downsample_min_total=0,
                             mask_ratio=0.0, zero_mask_ratio=1.0, mask_token_prob=1.0, random_token_prob=0.0)
    rng = step_generator(1, 0)
    examples = [make_example(c["gene_ids"], c["counts"], c["total_counts"], n_genes, config, rng) for c in cells]
    expected_t = np.array([np.log10(c["total_counts"]) for c in cells])
    assert np.allclose([e.target_depth for e in examples], expected_t)
    depth_drop = expected_t - np.array([e.source_depth for e in examples])
    assert np.allclose(depth_drop, np.log10(5), atol=0.1)  # keep-rate ~ Beta(200, 800), mean 0.2
    for cell, example in zip(cells, examples):
        values, target, _, scored = _dense(example, n_genes)
        assert (values > 0).sum() < cell["gene_ids"].size  # thinning lost genes ...
        lost = scored & (target > 0)
        assert lost.any()  # ... which are scored as zeros of the input with their original value
        assert np.allclose(target[scored], _original(cell, n_genes)[scored], rtol=1e-6)


def test_downsampling_follows_the_papers_scheme():
    """Cells under 1,000 counts never; the others half of the time, keeping a Beta(2, 2) fraction."""
    counts = np.full(500, 4.0, dtype=np.float32)  # 2,000 counts
    config = ObjectiveConfig()
    rng = np.random.default_rng(0)
    kept = np.array([downsample(counts, 2000.0, config, rng)[1] / 2000.0 for _ in range(4000)])
    thinned = kept < 1.0
    assert abs(thinned.mean() - 0.5) < 0.03
    fractions = kept[thinned]
    assert abs(fractions.mean() - 0.5) < 0.02 and abs(fractions.var() - 0.05) < 0.006  # Beta(2, 2): 1/20
    assert 0.02 < (fractions < 0.2).mean() < 0.16  # P(b < 0.2) = 0.104
    shallow = np.full(100, 9.0, dtype=np.float32)  # 900 counts
    assert all(downsample(shallow, 900.0, config, rng)[1] == 900.0 for _ in range(200))


def test_zero_targets_are_zero_genes_of_the_input(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 30), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=0.0, mask_ratio=0.0, zero_mask_ratio=0.2)
    rng = step_generator(3, 0)
    for cell in cells:
        example = make_example(cell["gene_ids"], cell["counts"], cell["total_counts"], n_genes, config, rng)
        zero_genes = np.setdiff1d(np.arange(n_genes), cell["gene_ids"])
        assert set(example.target_ids) <= set(zero_genes)
        assert example.target_ids.size == round(0.2 * zero_genes.size)
        assert np.all(np.diff(example.gene_ids) > 0)


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
    assert torch.equal(a.inputs.encoder.values, b.inputs.encoder.values) and torch.equal(a.positions, b.positions)
    assert not torch.equal(a.positions, c.positions)


def test_batch_feeds_the_model_what_the_example_says(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 4), pbmc_counts.n_vars
    layout = ModelConfig.preset("tiny", n_genes=n_genes)
    batch = make_batch(cells, n_genes, ObjectiveConfig(), step_generator(5, 0), layout)
    rng = step_generator(5, 0)
    for row, cell in enumerate(cells):
        example = make_example(cell["gene_ids"], cell["counts"], cell["total_counts"], n_genes, ObjectiveConfig(),
                               rng)
        enc = batch.inputs.encoder
        real = ~enc.padding_mask[row]
        visible = example.gene_ids[~example.hidden & (example.values > 0)]
        assert enc.gene_ids[row, real].tolist() == [*visible.tolist(), layout.t_position, layout.s_position]
        hidden = batch.inputs.hidden[batch.inputs.hidden[:, 0] == row, 1]
        assert hidden.tolist() == example.gene_ids[example.hidden].tolist()
        assert batch.positions[batch.positions[:, 0] == row, 1].tolist() == example.target_ids.tolist()


def test_masked_mse_is_the_mean_over_scored_positions():
    prediction, target = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)
    assert masked_mse(prediction, target).item() == pytest.approx((1 + 4 + 9) / 3)
    assert masked_mse(torch.zeros(0), torch.zeros(0)).item() == 0.0


def test_zero_genes_given_a_random_value_come_from_the_cell(pbmc_counts):
    cells, n_genes = _cells(pbmc_counts, 8), pbmc_counts.n_vars
    config = ObjectiveConfig(downsample_prob=0.0, mask_token_prob=0.0, random_token_prob=1.0, zero_mask_ratio=0.5)
    example = make_example(cells[0]["gene_ids"], cells[0]["counts"], cells[0]["total_counts"], n_genes, config,
                           step_generator(0, 0))
    values, target, _, scored = _dense(example, n_genes)
    randomised = scored & (target == 0)
    assert randomised.any()
    original = _original(cells[0], n_genes)
    own_values = set(np.round(original[original > 0], 5))
    assert set(np.round(values[randomised], 5)) <= own_values


@pytest.mark.parametrize("field, value", [("mask_ratio", 1.5), ("downsample_beta", (0.0, 2.0)),
                                          ("mask_token_prob", -0.1)])
def test_bad_ratios_are_refused(field, value):
    with pytest.raises(ScfmError, match=field.split("_")[0]):
        ObjectiveConfig(**{field: value})
