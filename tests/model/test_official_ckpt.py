"""Loading the released checkpoint layout strictly, and our own directory format."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch import nn

from scfm.data.vocab import Vocabulary
from scfm.errors import ScfmError
from scfm.model import ModelConfig
from scfm.model.checkpoint import (
    load_checkpoint, official_state_shapes, save_checkpoint, write_official_style_checkpoint,
)

N_GENES = 40


@pytest.fixture(scope="module")
def tiny():
    return ModelConfig.preset("tiny", n_genes=N_GENES)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary([f"GENE{i}" for i in range(N_GENES)])


@pytest.fixture(scope="module")
def official(tmp_path_factory, tiny):
    return write_official_style_checkpoint(tmp_path_factory.mktemp("ckpt") / "models.ckpt", tiny, seed=5)


def test_every_version_loads_strictly_with_the_official_values(official, tiny, vocab):
    raw = torch.load(official, weights_only=True)
    for version, key in (("ce", "cell"), ("rde", "rde"), ("gene", "gene")):
        loaded = load_checkpoint(official, version=version, vocab=vocab)
        assert loaded.config == tiny
        assert loaded.source.startswith(f"official:{key}:")
        state, ours = raw[key]["state_dict"], loaded.model.state_dict()
        torch.testing.assert_close(ours["encoder.1.qkv.weight"], state["model.encoder.transformer_encoder.1.self_attn.in_proj_weight"])
        torch.testing.assert_close(ours["value_embed.mask_vector"], state["model.token_emb.emb_mask.weight"][0])
        torch.testing.assert_close(ours["decoder.1.attn.projection"],
                                   state["model.decoder.performer.net.layers.1.0.fn.fast_attention.projection_matrix"])
        torch.testing.assert_close(ours["head.weight"], state["model.to_final.weight"])
    # the three versions are different models
    a = load_checkpoint(official, version="ce", vocab=vocab).model.state_dict()["encoder.0.qkv.weight"]
    b = load_checkpoint(official, version="rde", vocab=vocab).model.state_dict()["encoder.0.qkv.weight"]
    assert not torch.equal(a, b)


def test_encoder_matches_torch_transformer_layers_on_official_weights(official, tiny, vocab):
    """The released encoder is a stack of nn.TransformerEncoderLayer (post-LN, ReLU) + LayerNorm."""
    loaded = load_checkpoint(official, version="ce", vocab=vocab)
    state = {k[len("model."):]: v for k, v in torch.load(official, weights_only=True)["cell"]["state_dict"].items()}
    reference = nn.ModuleList(
        nn.TransformerEncoderLayer(tiny.encoder_dim, tiny.encoder_heads, tiny.encoder_ff_dim, dropout=0.0,
                                   batch_first=True) for _ in range(tiny.encoder_layers))
    reference.load_state_dict({k[len("encoder.transformer_encoder."):]: v for k, v in state.items()
                               if k.startswith("encoder.transformer_encoder.")})
    final = nn.LayerNorm(tiny.encoder_dim)
    final.load_state_dict({"weight": state["encoder.norm.weight"], "bias": state["encoder.norm.bias"]})
    reference.eval()

    torch.manual_seed(0)
    values = torch.rand(3, 9) * 3
    gene_ids = torch.stack([torch.randperm(N_GENES)[:9].sort().values for _ in range(3)])
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    model = loaded.model
    with torch.no_grad():
        x = model.value_embed(values, padded=padding) + model.position_embed(gene_ids)
        for layer in reference:
            x = layer(x, src_key_padding_mask=padding)
        expected = final(x)
        ours = model.encode(values, gene_ids, padding)
    torch.testing.assert_close(ours[~padding], expected[~padding], atol=1e-5, rtol=1e-5)


def test_value_embedding_follows_the_official_formula(official, vocab):
    model = load_checkpoint(official, version="ce", vocab=vocab).model
    state = {k[len("model."):]: v for k, v in torch.load(official, weights_only=True)["cell"]["state_dict"].items()}
    v = torch.tensor([[0.0, 0.7, 2.3, 4.0]])
    h = torch.nn.functional.leaky_relu(v[..., None] @ state["token_emb.mlp.weight"].T + state["token_emb.mlp.bias"], 0.1)
    w = torch.softmax(h + h @ state["token_emb.mlp2.weight"].T + state["token_emb.mlp2.bias"], dim=-1)
    expected = w @ state["token_emb.emb.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model.value_embed(v), expected)
        masked = model.value_embed(v, masked=torch.tensor([[False, True, False, False]]))
    torch.testing.assert_close(masked[0, 1], state["token_emb.emb_mask.weight"][0])


@pytest.mark.slow
def test_base_100m_official_layout_loads_strictly(tmp_path):
    base = ModelConfig.preset("base-100m")
    path = write_official_style_checkpoint(tmp_path / "models.ckpt", base, seed=0, versions=("cell",))
    loaded = load_checkpoint(path, version="ce", vocab=Vocabulary([f"G{i}" for i in range(base.n_genes)]))
    assert loaded.config == base
    n_params = sum(p.numel() for p in loaded.model.parameters())
    assert 115e6 < n_params < 125e6 and n_params == base.n_parameters()
    assert loaded.model.position_embed.weight.shape == (19267, 768)
    assert loaded.model.decoder[0].attn.projection.shape == (266, 64)


def _rewrite(src, dst, edit):
    data = torch.load(src, weights_only=True)
    edit(data)
    torch.save(data, dst)
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["cell"]["state_dict"].__setitem__("model.encoder.extra_gate.weight", torch.ones(2)),
     "unexpected keys.*encoder.extra_gate.weight"),
    (lambda d: d["cell"]["state_dict"].pop("model.encoder.transformer_encoder.0.linear1.bias"),
     "missing keys encoder.0.ff_in.bias"),
    (lambda d: d["cell"]["state_dict"].__setitem__("model.to_final.weight", torch.ones(1, 7)),
     "shape mismatch for head.weight"),
    (lambda d: d.pop("cell"), "no 'cell' model for version ce"),
    (lambda d: d["cell"]["config"].__setitem__("model", "performer_gau"), "not supported"),
    (lambda d: d["cell"]["config"]["model_config"]["mae_autobin"].pop("seq_len"), "unexpected official config"),
])
def test_unexpected_official_content_is_a_clear_error(official, vocab, tmp_path, edit, message):
    bad = _rewrite(official, tmp_path / "bad.ckpt", edit)
    with pytest.raises(ScfmError, match=message) as info:
        load_checkpoint(bad, version="ce", vocab=vocab)
    assert info.value.path == os.fspath(bad)


def test_pickled_code_is_never_executed(tmp_path, vocab):
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as handle:
        pickle.dump({"cell": Evil()}, handle, protocol=2)
    with pytest.raises(ScfmError, match="refused: holds pickled Python objects") as info:
        load_checkpoint(path, vocab=vocab)
    assert not (tmp_path / "pwned").exists()
    assert "weights_only" not in str(info.value)  # torch's advice to load it anyway is not passed on


def test_official_needs_a_matching_vocabulary(official, tmp_path):
    with pytest.raises(ScfmError, match="--vocab"):
        load_checkpoint(official, version="ce")
    short = Vocabulary([f"GENE{i}" for i in range(N_GENES - 1)])
    with pytest.raises(ScfmError, match="vocabulary mismatch"):
        load_checkpoint(official, version="ce", vocab=short)
    with pytest.raises(ScfmError, match="unknown version"):
        load_checkpoint(official, version="xx", vocab=short)
    with pytest.raises(ScfmError, match="not found"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_directory_round_trip_is_exact(official, tiny, vocab, tmp_path):
    loaded = load_checkpoint(official, version="gene", vocab=vocab)
    out = save_checkpoint(tmp_path / "ckpt", loaded.model, loaded.config, vocab, extra={"from": "official"})
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "vocab.tsv"]
    again = load_checkpoint(out)
    assert again.config == tiny and again.vocab.genes == vocab.genes and again.extra == {"from": "official"}
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    other = Vocabulary([f"OTHER{i}" for i in range(N_GENES)])
    with pytest.raises(ScfmError, match="vocabulary mismatch"):
        load_checkpoint(out, vocab=other)
    (out / "vocab.tsv").unlink()
    with pytest.raises(ScfmError, match="vocab.tsv is missing"):
        load_checkpoint(out)


def test_official_layout_shapes_cover_every_model_weight(tiny):
    from scfm.model.checkpoint import _official_to_ours
    from scfm.model import XTrimoGene

    mapped = {_official_to_ours(k) for k in official_state_shapes(tiny)} - {None}
    assert mapped == set(XTrimoGene(tiny).state_dict())
