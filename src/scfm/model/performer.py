"""Performer (FAVOR+) layers for the decoder: linear-time softmax attention over ~19k positions.

Attention ``softmax(q k^T / sqrt(d)) v`` is approximated with positive random features
``phi(x) = m^-1/2 * exp(W x' - |x'|^2 / 2)`` (x' = x / d^1/4, W: m x d orthogonal Gaussian rows),
so that ``out = phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k))`` costs O(n m d) instead of O(n^2 d).
Non-causal, no padding: the decoder always sees every position of the vocabulary.

The projection matrix ``W`` is a buffer saved with the weights (the released checkpoint stores it).
It is drawn at construction; pretraining draws new ones every ``--performer-redraw-interval``
training calls (the released code does so every 1,000), from a generator seeded by the run's seed
and the redraw's number (:func:`redraw_generator`), so the draws are the same on every rank and a
resumed run recomputes them. Inference never redraws: a checkpoint's projections are its own.

Written from the FAVOR+ paper (Choromanski et al. 2021) and the shapes of the released checkpoint.
Two deliberate differences from the reference implementation: the key features are stabilised with
the maximum over each cell, not over the whole batch, so a cell's output never depends on its batch
mates (for a batch of one cell both are the same); and the stabilising maxima are constants for the
gradient. They cancel in the attention's normalisation (up to ``FEATURE_EPS``), so their gradient is
next to nothing, but differentiating a maximum over ~19k positions costs as much as the features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scfm.model.config import ModelConfig

FEATURE_EPS = 1e-4


def orthogonal_gaussian_projection(n_features: int, dim: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_features, dim): blocks of orthonormal rows, each row rescaled to a chi(dim)-distributed norm."""
    blocks = []
    for _ in range(math.ceil(n_features / dim)):
        gaussian = torch.randn(dim, dim, generator=generator)
        q, _ = torch.linalg.qr(gaussian)
        blocks.append(q.T)
    rows = torch.cat(blocks)[:n_features]
    norms = torch.randn(n_features, dim, generator=generator).norm(dim=1)
    return norms[:, None] * rows


def redraw_generator(seed: int, draw: int) -> torch.Generator:
    """The generator for the ``draw``-th redraw (1, 2, ...) of a run seeded with ``seed``."""
    import numpy as np

    state = np.random.SeedSequence([int(seed), int(draw), 0x7E5F]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def softmax_random_features(x: torch.Tensor, projection: torch.Tensor, *, is_query: bool) -> torch.Tensor:
    """x (B, h, n, d) -> positive features (B, h, n, m) whose dot products approximate exp(q.k / sqrt(d)).

    ``m^-1/2 (exp(W x' - |x'|^2 / 2 - max) + eps)``, written as one exp of the full exponent plus a
    constant: the (B, h, n, m) features are the decoder's largest tensors, so each pass over them counts.
    """
    dim, n_features = x.shape[-1], projection.shape[0]
    scale = dim**-0.25
    projected = torch.einsum("bhnd,md->bhnm", x, (projection * scale).to(x.dtype))
    half_sq_norm = (x * x).sum(-1, keepdim=True) * (scale * scale / 2)
    # subtracting a maximum keeps exp() finite; it cancels in the normalisation up to FEATURE_EPS
    if is_query:
        stabiliser = projected.detach().amax(dim=-1, keepdim=True)
    else:
        stabiliser = projected.detach().amax(dim=(1, 2, 3), keepdim=True)  # per cell
    log_ratio = -0.5 * math.log(n_features)
    return torch.exp(projected - (half_sq_norm + stabiliser - log_ratio)) + n_features**-0.5 * FEATURE_EPS


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k (B, h, n, m) features; v (B, h, n, e) -> (B, h, n, e)."""
    k_sum = k.sum(dim=-2)  # (B, h, m)
    normaliser = torch.einsum("bhnm,bhm->bhn", q, k_sum)
    context = torch.einsum("bhnm,bhne->bhme", k, v)  # (B, h, m, e)
    return torch.einsum("bhnm,bhme->bhne", q, context) / normaliser.unsqueeze(-1)


class PerformerSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        dim, inner = config.decoder_dim, config.decoder_heads * config.decoder_head_dim
        self.n_heads = config.decoder_heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_out = nn.Linear(inner, dim)
        projection = orthogonal_gaussian_projection(config.performer_features, config.decoder_head_dim, generator)
        self.register_buffer("projection", projection)  # (m, head_dim)

    @torch.no_grad()
    def redraw(self, generator: torch.Generator) -> None:
        fresh = orthogonal_gaussian_projection(*self.projection.shape, generator)
        self.projection.copy_(fresh.to(self.projection.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t):  # (B, n, h*e) -> (B, h, n, e)
            return t.view(b, n, self.n_heads, -1).transpose(1, 2)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        q = softmax_random_features(q, self.projection, is_query=True)
        k = softmax_random_features(k, self.projection, is_query=False)
        out = linear_attention(q, k, v)  # (B, h, n, e)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PerformerLayer(nn.Module):
    """Pre-LN: x + attn(norm(x)), then x + ff(norm(x)) with a GELU feed-forward."""

    def __init__(self, config: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        dim, eps = config.decoder_dim, config.layer_norm_eps
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.attn = PerformerSelfAttention(config, generator)
        self.ff_norm = nn.LayerNorm(dim, eps=eps)
        self.ff_in = nn.Linear(dim, config.decoder_ff_dim)
        self.ff_out = nn.Linear(config.decoder_ff_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.ff_out(F.gelu(self.ff_in(self.ff_norm(x))))
