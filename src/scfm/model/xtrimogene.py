"""xTrimoGene: the asymmetric encoder-decoder behind scFoundation.

    values, gene ids ──► value embedding + position embedding
                         │  encoder: post-LN transformer over the nonzero tokens (+ T, S) only
                         ▼
                     encoded (B, L, d) ──► cell_embedding (pool "all": S, T, max, mean → 4d)
                         │  every position of the decoder input is an encoder output, the learned
                         │  mask vector, or the value embedding of 0 (a zero gene); + position again
                         ▼
                     Linear d → decoder_dim, Performer layers, LayerNorm, LayerNorm
                         ▼
                     gene embeddings (B, P, decoder_dim) ──► Linear → 1: expression (B, P)

Interfaces:
    model = XTrimoGene(config, seed=0, init="pytorch")
    encoded = model.encode(values, gene_ids, padding_mask)          # (B, L, d)
    emb = model.cell_embedding(encoded, encoder_inputs, pool="all")  # (B, 4d) or (B, d) for "max"
    genes = model.decode(encoded, batch)                             # (B, P, decoder_dim)
    predictions = model(batch)                                       # (B, P), P = n_genes + 2
    scored = model(batch, positions)                                 # (N,) at (cell, position) pairs
where ``encoder_inputs`` is a ``scfm.model.inputs.EncoderInputs`` and ``batch`` a ``PretrainBatch``.
Padding never changes a real token's output: attention uses a key padding mask, pooling masks it too.

The decoder input is built without embedding every position: ``decoder_embed`` is linear, so
``W (content + position) + b`` splits into a position part ``W position`` computed once per batch
(it is the same for every cell) and a content part that is one vector (``W zero + b``) for the
thousands of zero genes, and a correction only at the few encoder tokens and hidden genes. The
decoder's cost is then its Performer layers, linear in the number of positions. Training asks for
predictions at the scored positions only (``model(batch, positions)``), so the final norms and the
head run there and nowhere else.

Initialisation (``init``): ``"pytorch"`` leaves every parameter as the released code does, i.e. at
PyTorch's defaults (``nn.Linear`` U(±1/sqrt(fan_in)) weights and biases; ``nn.Embedding`` N(0, 1)
for the bin, mask, padding and position tables; LayerNorm 1/0; the encoder's attention as
``nn.MultiheadAttention`` sets it: Xavier-uniform input projection, zero projection biases). It
matters most for the value embedding's 1 → bins layer: with small weights every value lands in the
same bins and the embedding hardly depends on the value. ``"small-normal"`` is the GPT-style
N(0, 0.02) alternative. Both draw from ``seed`` only, so a seed gives the same model every time.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scfm.model.config import ModelConfig
from scfm.model.inputs import EncoderInputs, PretrainBatch
from scfm.model.performer import PerformerLayer, PerformerSelfAttention

POOLS = ("all", "max")
INIT_SCHEMES = ("pytorch", "small-normal")


class AutoBinValueEmbedding(nn.Module):
    """Scalar → d-vector by a learned soft assignment to ``n_bins`` bin vectors.

    h1 = LeakyReLU(0.1)(Linear(1→bins) v);  w = softmax(alpha * h1 + Linear(bins→bins) h1);  e = w @ bins
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bin_alpha = config.bin_alpha
        self.to_bins = nn.Linear(1, config.n_bins)
        self.mix_bins = nn.Linear(config.n_bins, config.n_bins)
        self.bins = nn.Parameter(torch.randn(config.n_bins, config.encoder_dim))
        self.mask_vector = nn.Parameter(torch.randn(config.encoder_dim))
        self.pad_vector = nn.Parameter(torch.randn(config.encoder_dim))

    def forward(self, values: torch.Tensor, *, masked: torch.Tensor | None = None,
                padded: torch.Tensor | None = None) -> torch.Tensor:
        h = F.leaky_relu(self.to_bins(values.unsqueeze(-1)), 0.1)  # (B, L, bins)
        weights = torch.softmax(self.bin_alpha * h + self.mix_bins(h), dim=-1)
        emb = weights @ self.bins.to(weights.dtype)  # (B, L, d)
        if masked is not None:
            emb = torch.where(masked.unsqueeze(-1), self.mask_vector.to(emb.dtype), emb)
        if padded is not None:
            emb = torch.where(padded.unsqueeze(-1), self.pad_vector.to(emb.dtype), emb)
        return emb


class EncoderLayer(nn.Module):
    """Post-LN transformer layer (the layout of ``nn.TransformerEncoderLayer``, ReLU) on SDPA."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        dim, eps = config.encoder_dim, config.layer_norm_eps
        self.n_heads = config.encoder_heads
        self.dropout = config.dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, config.encoder_ff_dim)
        self.ff_out = nn.Linear(config.encoder_ff_dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        # x (B, L, d); attend (B, 1, 1, L) bool, False on padded keys
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p)  # (B, h, L, hd)
        a = a.transpose(1, 2).reshape(b, n, d)
        x = self.norm1(x + F.dropout(self.attn_out(a), p, self.training))
        ff = self.ff_out(F.dropout(F.relu(self.ff_in(x)), p, self.training))
        return self.norm2(x + F.dropout(ff, p, self.training))

    def forward_packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """Inference on the real tokens of several cells back to back, x (N, d); ``lengths`` per cell.

        The linear layers see no padding, and each cell's attention runs without a mask (on a CPU the
        unmasked kernel is the faster one). The same function as :meth:`forward` up to float rounding.
        """
        n, d = x.shape
        qkv = self.qkv(x).view(n, 3, self.n_heads, d // self.n_heads).permute(1, 2, 0, 3)  # (3, h, N, hd)
        ends = np.cumsum(lengths)
        a = torch.cat([F.scaled_dot_product_attention(*qkv[:, None, :, end - length:end])[0]
                       for end, length in zip(ends.tolist(), lengths)], dim=1)  # (h, N, hd)
        x = self.norm1(x + self.attn_out(a.transpose(0, 1).reshape(n, d)))
        return self.norm2(x + self.ff_out(F.relu(self.ff_in(x))))


class XTrimoGene(nn.Module):
    def __init__(self, config: ModelConfig, *, seed: int | None = None, init: str = "pytorch"):
        super().__init__()
        if init not in INIT_SCHEMES:
            raise ValueError(f"init must be one of {INIT_SCHEMES}, got {init!r}")
        self.config = config
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        d = config.encoder_dim

        self.value_embed = AutoBinValueEmbedding(config)
        self.position_embed = nn.Embedding(config.n_positions + 1, d)  # + the padding position

        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))
        self.encoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)

        self.decoder_embed = nn.Linear(d, config.decoder_dim)
        self.decoder = nn.ModuleList(PerformerLayer(config, generator) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(config.decoder_dim, eps=config.layer_norm_eps)
        self.output_norm = nn.LayerNorm(config.decoder_dim, eps=config.layer_norm_eps)
        self.head = nn.Linear(config.decoder_dim, 1)

        if init == "pytorch":
            self.reset_parameters_pytorch(generator)
        else:
            self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """GPT-style small normal weights, zero biases, unit LayerNorms (projection buffers kept)."""
        for name, param in self.named_parameters():
            if param.dim() >= 2 or name.endswith(("bins", "mask_vector", "pad_vector")):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()

    @torch.no_grad()
    def reset_parameters_pytorch(self, generator: torch.Generator | None = None) -> None:
        """What the released code's modules start from (see the module docstring), drawn from ``generator``."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                bound = module.in_features ** -0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                module.bias.uniform_(-bound, bound, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(generator=generator)
        for table in (self.value_embed.bins, self.value_embed.mask_vector, self.value_embed.pad_vector):
            table.normal_(generator=generator)
        for layer in self.encoder:  # nn.MultiheadAttention's own reset
            fan_out, fan_in = layer.qkv.weight.shape
            bound = (6.0 / (fan_in + fan_out)) ** 0.5
            layer.qkv.weight.uniform_(-bound, bound, generator=generator)
            layer.qkv.bias.zero_()
            layer.attn_out.bias.zero_()

    @torch.no_grad()
    def redraw_random_features(self, generator: torch.Generator) -> None:
        """New Performer projections for every decoder layer, in layer order (training redraws them)."""
        for module in self.modules():
            if isinstance(module, PerformerSelfAttention):
                module.redraw(generator)

    # ------------------------------------------------------------------------------ encoder
    def encode(self, values: torch.Tensor, gene_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) values, position ids and padding flags → (B, L, encoder_dim)."""
        x = self.value_embed(values, padded=padding_mask) + self.position_embed(gene_ids)
        attend = ~padding_mask[:, None, None, :]
        for layer in self.encoder:
            x = layer(x, attend)
        return self.encoder_norm(x)

    @torch.no_grad()
    def encode_packed(self, values: torch.Tensor, gene_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` for inference, computing only real tokens (padded rows of the result are zeros).

        Bucketing keeps padding small but not nil, and a masked attention kernel is slower on a CPU than
        an unmasked one per cell; the pooled embeddings never read padded rows.
        """
        if self.training:
            raise RuntimeError("encode_packed is for inference (eval mode, no dropout)")
        x = self.value_embed(values, padded=padding_mask) + self.position_embed(gene_ids)
        real = ~padding_mask
        tokens = x[real]
        lengths = real.sum(dim=1).tolist()
        for layer in self.encoder:
            tokens = layer.forward_packed(tokens, lengths)
        tokens = self.encoder_norm(tokens)
        out = tokens.new_zeros(x.shape)
        out[real] = tokens
        return out

    def cell_embedding(self, encoded: torch.Tensor, batch: EncoderInputs, pool: str = "all") -> torch.Tensor:
        """``all``: concat(S, T, max over genes, mean over genes) (B, 4d); ``max``: max over all tokens (B, d)."""
        real = ~batch.padding_mask
        if pool == "max":
            return encoded.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(dim=1)
        if pool != "all":
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        cfg = self.config
        genes = (real & (batch.gene_ids < cfg.n_genes)).unsqueeze(-1)  # (B, L, 1)
        s = self._token_at(encoded, batch.gene_ids == cfg.s_position)
        t = self._token_at(encoded, batch.gene_ids == cfg.t_position)
        gene_max = encoded.masked_fill(~genes, float("-inf")).amax(dim=1)
        gene_mean = (encoded * genes).sum(dim=1) / genes.sum(dim=1).clamp(min=1)
        return torch.cat([s, t, gene_max, gene_mean], dim=-1)

    @staticmethod
    def _token_at(encoded: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        # exactly one True per row (T and S are always encoder tokens)
        index = where.long().argmax(dim=1)
        return encoded[torch.arange(encoded.shape[0], device=encoded.device), index]

    # ------------------------------------------------------------------------------ decoder
    def decoder_input(self, encoded: torch.Tensor, batch: PretrainBatch) -> torch.Tensor:
        """``decoder_embed(content + position)`` at every position (B, P, decoder_dim); see the module docstring."""
        cfg = self.config
        b, n_pos = encoded.shape[0], cfg.n_positions
        weight, bias = self.decoder_embed.weight, self.decoder_embed.bias
        zero = self.value_embed(encoded.new_zeros(1))[0]  # (d,) the value embedding of a zero gene
        per_position = F.linear(self.position_embed.weight[:n_pos].to(weight.dtype), weight)  # (P, dd), shared
        x = (per_position + F.linear(zero.to(weight.dtype), weight, bias)).expand(b, n_pos, -1).reshape(b * n_pos, -1)

        enc = batch.encoder
        real = ~enc.padding_mask
        rows = torch.arange(b, device=encoded.device).unsqueeze(1).expand_as(enc.gene_ids)[real]
        index = [rows * n_pos + enc.gene_ids[real]]
        content = [encoded[real]]
        if batch.hidden.numel():
            index.append(batch.hidden[:, 0] * n_pos + batch.hidden[:, 1])
            content.append(self.value_embed.mask_vector.expand(batch.hidden.shape[0], -1))
        if batch.extra_positions.numel():
            index.append(batch.extra_positions[:, 0] * n_pos + batch.extra_positions[:, 1])
            content.append(self.value_embed(batch.extra_values))
        delta = F.linear((torch.cat(content) - zero).to(weight.dtype), weight)
        return x.index_add_(0, torch.cat(index), delta).view(b, n_pos, -1)

    def decoder_states(self, encoded: torch.Tensor, batch: PretrainBatch) -> torch.Tensor:
        """The Performer layers' output (B, P, decoder_dim), before the final norms."""
        x = self.decoder_input(encoded, batch)
        for layer in self.decoder:
            x = layer(x)
        return x

    def decode(self, encoded: torch.Tensor, batch: PretrainBatch) -> torch.Tensor:
        """Encoder outputs + the other positions → gene embeddings (B, P, decoder_dim)."""
        return self.output_norm(self.decoder_norm(self.decoder_states(encoded, batch)))

    def forward(self, batch: PretrainBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted expression at every position (B, P), or at ``positions`` ((N, 2) cell, position) → (N,)."""
        enc = batch.encoder
        states = self.decoder_states(self.encode(enc.values, enc.gene_ids, enc.padding_mask), batch)
        if positions is not None:
            states = states[positions[:, 0], positions[:, 1]]
        return self.head(self.output_norm(self.decoder_norm(states))).squeeze(-1)

    def predict_expression(self, batch: PretrainBatch) -> torch.Tensor:
        return self.forward(batch)
