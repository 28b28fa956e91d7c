"""Model dimensions: one dataclass, a few named presets.

``ModelConfig`` holds every number that fixes the shape of an xTrimoGene model (see
``scfm.model.xtrimogene``). Presets:

- ``tiny``: a few hundred thousand parameters, for tests and laptops.
- ``small``: a few million parameters, for quick pretraining experiments.
- ``base-100m``: the shape of the released scFoundation checkpoint (19,264 genes, 768-d encoder with
  12 layers, 512-d Performer decoder with 6 layers; about 119M parameters).

Token layout (shared with ``scfm.model.inputs``): genes take positions ``0 .. n_genes-1`` in
vocabulary order, then the two scalar tokens ``T`` (target read depth, log10) at ``n_genes`` and
``S`` (source read depth, log10) at ``n_genes + 1``; ``n_genes + 2`` is the padding position.

    ModelConfig.preset("tiny", n_genes=len(vocab))
    ModelConfig.from_dict(json.load(f)["model"])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from scfm.errors import ScfmError


@dataclass(frozen=True)
class ModelConfig:
    n_genes: int = 19264

    # value embedding ("auto-discretisation"): a soft assignment of each scalar to n_bins vectors
    n_bins: int = 100
    bin_alpha: float = 1.0
    # the official model marks masked / padded values with these numbers; we keep them so that
    # official weights mean the same thing, but build the flags explicitly (see inputs.py)
    mask_value: float = 102.0
    pad_value: float = 103.0

    # encoder: post-LN transformer over the nonzero tokens
    encoder_dim: int = 768
    encoder_layers: int = 12
    encoder_heads: int = 12
    encoder_ff_dim: int = 3072

    # decoder: pre-LN Performer (FAVOR+) over all positions
    decoder_dim: int = 512
    decoder_layers: int = 6
    decoder_heads: int = 8
    decoder_head_dim: int = 64
    decoder_ff_dim: int = 2048
    performer_features: int = 266  # int(64 * ln 64), the official default for 64-d heads

    dropout: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("n_genes", "n_bins", "encoder_dim", "encoder_layers", "encoder_heads", "encoder_ff_dim",
                     "decoder_dim", "decoder_layers", "decoder_heads", "decoder_head_dim", "decoder_ff_dim",
                     "performer_features"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ScfmError(f"model config: {name} must be a positive integer, got {value!r}")
        if self.encoder_dim % self.encoder_heads:
            raise ScfmError(
                f"model config: encoder_dim {self.encoder_dim} is not divisible by encoder_heads {self.encoder_heads}"
            )
        for name in ("bin_alpha", "mask_value", "pad_value", "layer_norm_eps"):
            if not isinstance(getattr(self, name), (int, float)) or not math.isfinite(getattr(self, name)):
                raise ScfmError(f"model config: {name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ScfmError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        if self.layer_norm_eps <= 0:
            raise ScfmError(f"model config: layer_norm_eps must be positive, got {self.layer_norm_eps}")

    # ---------------------------------------------------------------- token layout
    @property
    def t_position(self) -> int:
        return self.n_genes

    @property
    def s_position(self) -> int:
        return self.n_genes + 1

    @property
    def n_positions(self) -> int:
        """Genes + T + S: the decoder's sequence length."""
        return self.n_genes + 2

    @property
    def pad_position(self) -> int:
        return self.n_genes + 2

    @property
    def cell_embedding_dim(self) -> int:
        """Width of the ``pool="all"`` cell embedding: S, T, max and mean, each ``encoder_dim``."""
        return 4 * self.encoder_dim

    # ---------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScfmError(f"model config: unknown field(s) {', '.join(unknown)}")
        return cls(**dict(data))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, n_genes: int | None = None) -> "ModelConfig":
        """A named shape; ``n_genes`` overrides the vocabulary size (e.g. ``len(vocab)``)."""
        if name not in PRESETS:
            raise ScfmError(f"unknown model preset {name!r} (choose from {', '.join(PRESETS)})")
        config = PRESETS[name]
        return config if n_genes is None else config.replace(n_genes=int(n_genes))

    def n_parameters(self) -> int:
        """Parameter count without building the model (random-feature buffers excluded)."""
        d, dd = self.encoder_dim, self.decoder_dim
        value_embed = (1 * self.n_bins + self.n_bins) + (self.n_bins * self.n_bins + self.n_bins) + self.n_bins * d + 2 * d
        position = (self.n_positions + 1) * d
        enc_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * self.encoder_ff_dim + self.encoder_ff_dim) + (
            self.encoder_ff_dim * d + d) + 4 * d
        inner = self.decoder_heads * self.decoder_head_dim
        dec_layer = 2 * dd + 3 * (dd * inner + inner) + (inner * dd + dd) + 2 * dd + (
            dd * self.decoder_ff_dim + self.decoder_ff_dim) + (self.decoder_ff_dim * dd + dd)
        return (value_embed + position + self.encoder_layers * enc_layer + 2 * d + (d * dd + dd)
                + self.decoder_layers * dec_layer + 2 * dd + 2 * dd + (dd + 1))

    def encoder_flops_per_token(self, length: int) -> float:
        """Forward multiply-adds x 2 per encoder token in a sequence of ``length`` tokens."""
        d, ff = self.encoder_dim, self.encoder_ff_dim
        dense = 2 * (4 * d * d + 2 * d * ff)
        attention = 2 * 2 * length * d  # scores and weighted sum
        return float(self.encoder_layers * (dense + attention))


def _default_features(head_dim: int) -> int:
    return int(head_dim * math.log(head_dim))


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        n_bins=16, encoder_dim=64, encoder_layers=2, encoder_heads=4, encoder_ff_dim=256,
        decoder_dim=32, decoder_layers=2, decoder_heads=2, decoder_head_dim=16, decoder_ff_dim=128,
        performer_features=_default_features(16),  # the released code derives the count from the head size
    ),
    "small": ModelConfig(
        n_bins=100, encoder_dim=256, encoder_layers=4, encoder_heads=8, encoder_ff_dim=1024,
        decoder_dim=128, decoder_layers=2, decoder_heads=4, decoder_head_dim=32, decoder_ff_dim=512,
        performer_features=_default_features(32),
    ),
    "base-100m": ModelConfig(),
}
