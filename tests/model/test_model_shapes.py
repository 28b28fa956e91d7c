"""Shapes, padding and batching invariants of the xTrimoGene model (tiny preset, CPU fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scfm.errors import ScfmError
from scfm.model import ModelConfig, XTrimoGene
from scfm.model import inputs as I

N_GENES = 60


@pytest.fixture(scope="module")
def config():
    return ModelConfig.preset("tiny", n_genes=N_GENES)


@pytest.fixture(scope="module")
def model(config):
    torch.manual_seed(0)
    return XTrimoGene(config, seed=1).eval()


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(3)
    dense = rng.poisson(rng.gamma(0.3, 2.0, size=(12, N_GENES))).astype(np.float32)
    dense[:, 0] += 1  # no empty cell
    dense[5, 1:] = 0  # one very short cell
    return sp.csr_matrix(dense)


def _tokens(counts, config, rows=None, depth="t4"):
    norm, totals = I.normalize_counts(counts)
    t, s = I.depth_tokens(totals, depth)
    return I.encoder_inputs_from_csr(norm, t, s, config, rows=rows)


def test_config_round_trip_and_presets():
    for name in ("tiny", "small", "base-100m"):
        cfg = ModelConfig.preset(name, n_genes=100)
        assert ModelConfig.from_dict(cfg.to_dict()) == cfg
        assert cfg.n_positions == 102 and cfg.pad_position == 102
    base = ModelConfig.preset("base-100m")
    assert base.n_genes == 19264 and base.encoder_dim == 768 and base.decoder_dim == 512
    assert 110e6 < base.n_parameters() < 125e6
    with pytest.raises(ScfmError, match="unknown model preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ScfmError, match="unknown field"):
        ModelConfig.from_dict({"n_genes": 5, "width": 3})


def test_parameter_count_matches_config(model, config):
    assert sum(p.numel() for p in model.parameters()) == config.n_parameters()


def test_pooling_shapes(model, config, counts):
    enc = _tokens(counts, config)
    with torch.no_grad():
        encoded = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
        assert encoded.shape == (12, enc.values.shape[1], config.encoder_dim)
        assert model.cell_embedding(encoded, enc, "all").shape == (12, 4 * config.encoder_dim)
        assert model.cell_embedding(encoded, enc, "max").shape == (12, config.encoder_dim)
    with pytest.raises(ValueError, match="pool"):
        model.cell_embedding(encoded, enc, "mean")


def test_tokens_are_nonzero_genes_then_t_and_s(config, counts):
    enc = _tokens(counts, config, depth="t3")
    row = 5
    real = ~enc.padding_mask[row]
    assert enc.gene_ids[row, real].tolist() == [0, config.t_position, config.s_position]
    assert enc.values[row, 1].item() == pytest.approx(3.0)
    assert enc.values[row, 2].item() == pytest.approx(np.log10(counts[row].sum()), rel=1e-6)


def test_batched_with_padding_equals_one_at_a_time(model, config, counts):
    enc = _tokens(counts, config)
    assert enc.padding_mask.any()
    with torch.no_grad():
        batched = {p: model.cell_embedding(model.encode(enc.values, enc.gene_ids, enc.padding_mask), enc, p)
                   for p in ("all", "max")}
        for row in range(counts.shape[0]):
            one = _tokens(counts, config, rows=[row])
            assert not one.padding_mask.any()
            encoded = model.encode(one.values, one.gene_ids, one.padding_mask)
            for pool in ("all", "max"):
                torch.testing.assert_close(model.cell_embedding(encoded, one, pool)[0], batched[pool][row],
                                           atol=1e-5, rtol=0)


def test_padding_content_is_ignored(model, config, counts):
    enc = _tokens(counts, config)
    garbage = enc.values.clone()
    garbage[enc.padding_mask] = 7.5  # whatever sits in padding must not matter
    ids = enc.gene_ids.clone()
    ids[enc.padding_mask] = 3
    with torch.no_grad():
        a = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
        b = model.encode(garbage, ids, enc.padding_mask)
    real = ~enc.padding_mask
    torch.testing.assert_close(a[real], b[real], atol=1e-6, rtol=0)


def test_forward_predicts_every_position_and_backpropagates(config, counts):
    model = XTrimoGene(config, seed=2).train()
    norm, totals = I.normalize_counts(counts)
    t, s = I.depth_tokens(totals, "f1")
    rng = np.random.default_rng(0)
    ids, vals, masked = [], [], []
    for row in range(4):
        r = norm[row]
        ids.append(r.indices)
        vals.append(r.data)
        masked.append(rng.random(r.nnz) < 0.3)
    batch = I.build_pretrain_batch(ids, vals, masked, t[:4], s[:4], config)
    # masked genes are hidden from the encoder and shown to the decoder as the mask vector
    for row in range(4):
        hidden = set(ids[row][masked[row]].tolist())
        seen = set(batch.encoder.gene_ids[row][~batch.encoder.padding_mask[row]].tolist())
        assert not hidden & seen
        assert sorted(batch.hidden[batch.hidden[:, 0] == row, 1].tolist()) == sorted(hidden)
    assert batch.extra_positions.numel() == 0  # counts are never negative
    pred = model(batch)
    assert pred.shape == (4, config.n_positions)
    # the scored positions alone give the same predictions as the full output
    at_hidden = model(batch, batch.hidden)
    torch.testing.assert_close(at_hidden, pred[batch.hidden[:, 0], batch.hidden[:, 1]], atol=1e-5, rtol=0)
    truth = torch.cat([torch.from_numpy(vals[row][masked[row]]) for row in range(4)])
    loss = ((at_hidden - truth) ** 2).mean()
    loss.backward()
    assert model.value_embed.mask_vector.grad.abs().sum() > 0
    assert model.encoder[0].qkv.weight.grad.abs().sum() > 0


def test_decoder_input_equals_embedding_every_position(model, config, counts):
    """The factored decoder input is decoder_embed(content + position) with content per position."""
    norm, totals = I.normalize_counts(counts)
    t, s = I.depth_tokens(totals, "t4")
    rng = np.random.default_rng(1)
    ids = [norm[r].indices for r in range(6)]
    vals = [norm[r].data.copy() for r in range(6)]
    vals[2][:3] = -0.5  # negative pre-normalised values reach the decoder, not the encoder
    masked = [rng.random(len(i)) < 0.3 for i in ids]
    batch = I.build_pretrain_batch(ids, vals, masked, t[:6], s[:6], config)
    with torch.no_grad():
        enc = batch.encoder
        encoded = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
        content = model.value_embed(torch.zeros(6, config.n_positions))  # zero genes
        for row in range(6):
            hidden, negative = ids[row][masked[row]], ids[row][~masked[row] & (vals[row] < 0)]
            content[row, hidden] = model.value_embed.mask_vector
            content[row, negative] = model.value_embed(torch.from_numpy(vals[row][~masked[row] & (vals[row] < 0)]))
            real = ~enc.padding_mask[row]
            content[row, enc.gene_ids[row, real]] = encoded[row, real]
        expected = model.decoder_embed(content + model.position_embed.weight[: config.n_positions])
        torch.testing.assert_close(model.decoder_input(encoded, batch), expected, atol=1e-5, rtol=1e-5)


def test_init_schemes_differ_where_it_matters(config):
    """PyTorch defaults make the value embedding depend on the value; N(0, 0.02) hardly does."""
    values = torch.linspace(0, 10, 50)
    spread = {}
    for init in ("pytorch", "small-normal"):
        model = XTrimoGene(config, seed=0, init=init)
        again = XTrimoGene(config, seed=0, init=init)
        for a, b in zip(model.state_dict().values(), again.state_dict().values()):
            assert torch.equal(a, b)  # the seed decides everything
        with torch.no_grad():
            embedded = model.value_embed(values)
        spread[init] = float(embedded.std(dim=0).mean() / embedded.abs().mean())
    assert spread["pytorch"] > 5 * spread["small-normal"]  # measured 0.43 vs 0.04
    layer = XTrimoGene(config, seed=0).encoder[0]
    assert torch.all(layer.qkv.bias == 0) and torch.all(layer.attn_out.bias == 0)


def test_dropout_acts_in_training_only(config, counts):
    model = XTrimoGene(config.replace(dropout=0.5), seed=0)
    enc = _tokens(counts, model.config)
    model.train()
    a = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
    b = model.encode(enc.values, enc.gene_ids, enc.padding_mask)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.encode(enc.values, enc.gene_ids, enc.padding_mask),
                                   model.encode(enc.values, enc.gene_ids, enc.padding_mask), atol=0, rtol=0)


def test_cell_embedding_is_differentiable(model, config, counts):
    enc = _tokens(counts, config)
    tuned = XTrimoGene(config, seed=1)
    tuned.load_state_dict(model.state_dict())
    for p in tuned.parameters():
        p.requires_grad_(False)
    for p in tuned.encoder[-1].parameters():
        p.requires_grad_(True)
    emb = tuned.cell_embedding(tuned.encode(enc.values, enc.gene_ids, enc.padding_mask), enc, "all")
    emb.sum().backward()
    assert tuned.encoder[-1].ff_out.weight.grad.abs().sum() > 0
    assert tuned.encoder[0].qkv.weight.grad is None


def test_length_buckets_cover_every_cell_once():
    n = np.array([5, 100, 7, 3, 50, 51, 2, 9])
    batches = I.length_buckets(n, batch_size=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(n)))
    assert all(len(b) <= 3 for b in batches)
    assert all(n[b].max() <= n[c].min() for b, c in zip(batches, batches[1:]))
    capped = I.length_buckets(n, batch_size=8, max_tokens=110)
    assert all(len(b) * n[b].max() <= 110 or len(b) == 1 for b in capped)


def test_target_depth_notation():
    totals = np.array([1000.0, 10.0])
    t, s = I.depth_tokens(totals, "t4")
    assert t.tolist() == [4.0, 4.0] and s.tolist() == pytest.approx([3.0, 1.0])
    assert I.depth_tokens(totals, "f10")[0].tolist() == pytest.approx([4.0, 2.0])
    assert I.depth_tokens(totals, "a1.5")[0].tolist() == pytest.approx([4.5, 2.5])
    for bad in ("x4", "t", "4", "f0"):
        with pytest.raises(ScfmError, match="target depth"):
            I.depth_tokens(totals, bad)


def test_normalisation_modes():
    counts = sp.csr_matrix(np.array([[1.0, 3.0, 0.0], [0.0, 2.0, 2.0]]))
    norm, totals = I.normalize_counts(counts, pre_normalized="F")
    np.testing.assert_allclose(norm.toarray()[0, :2], np.log1p(np.array([1, 3]) / 4 * 1e4), rtol=1e-6)
    assert totals.tolist() == [4.0, 4.0]
    same, totals_t = I.normalize_counts(counts, pre_normalized="T")
    np.testing.assert_array_equal(same.toarray(), counts.toarray())
    _, totals_a = I.normalize_counts(counts, pre_normalized="A", totals=[10.0, 20.0])
    assert totals_a.tolist() == [10.0, 20.0]
    with pytest.raises(ScfmError, match="totals"):
        I.normalize_counts(counts, pre_normalized="A")
    with pytest.raises(ScfmError, match="total count <= 0"):
        I.normalize_counts(sp.csr_matrix(np.array([[0.0, 0.0, 0.0]])))
