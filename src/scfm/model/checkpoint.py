"""Checkpoints: our directory format, and the released scFoundation ``.ckpt`` (read-only).

Our format is a directory::

    config.json        {"model": ModelConfig fields, "scfm_version": ..., "vocab_sha256": ..., "extra": {...}}
    model.safetensors  XTrimoGene state dict
    vocab.tsv          the gene vocabulary (row order = token id)

The official file is a ``torch.save`` dict with keys ``gene``, ``cell`` and ``rde`` (one model each;
``--version gene|ce|rde`` picks one). Each holds ``config`` (``model``, ``model_config[model]``,
``dataset_config['rnaseq']``) and ``state_dict`` whose keys start with ``model.``. It is read with
``torch.load(weights_only=True)`` (no pickled code runs) and mapped key by key onto our module names;
any key we do not know, or any of ours left unfilled, is an error. It carries no vocabulary: pass
the official gene list (``OS_scRNA_gene_index.19264.tsv``) as ``vocab``.

Every load is checked before a model is returned: a finite config, tensors of the expected shapes with
finite values, and (our format) a ``vocab.tsv`` whose SHA-256 is the one ``config.json`` recorded.

    save_checkpoint(directory, model, config, vocab, *, extra=None) -> Path
    load_checkpoint(path, *, version="ce", vocab=None, map_location="cpu") -> LoadedModel
    checkpoint_sha256(path, version="ce") -> str          # identity of the weights that are loaded
    write_official_style_checkpoint(path, config, seed=0, *, versions=("gene", "cell", "rde")) -> Path
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from scfm.errors import ScfmError
from scfm.model.config import ModelConfig
from scfm.model.performer import orthogonal_gaussian_projection
from scfm.model.xtrimogene import XTrimoGene
from scfm.utils import atomic_output

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.tsv"
VERSION_KEYS = {"ce": "cell", "rde": "rde", "gene": "gene"}
# the only key of the official state dict with no counterpart here: a counter of calls between
# random-feature redraws during training (our projections stay fixed)
IGNORED_OFFICIAL_KEYS = re.compile(r"^decoder\.performer\.calls_since_last_redraw$")


@dataclass
class LoadedModel:
    model: XTrimoGene
    config: ModelConfig
    vocab: Any  # scfm.data.vocab.Vocabulary
    source: str  # "scfm:<dir>" or "official:<key>:<file>"
    extra: dict | None = None


# ------------------------------------------------------------------------------------ our format
def save_checkpoint(directory, model: XTrimoGene, config: ModelConfig, vocab, *, extra: Mapping | None = None) -> Path:
    """Write ``directory`` atomically (config.json, model.safetensors, vocab.tsv)."""
    from safetensors.torch import save_file

    from scfm import __version__

    if len(vocab) != config.n_genes:
        raise ScfmError(f"vocabulary has {len(vocab)} genes but the model expects {config.n_genes}", directory)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    meta = {"model": config.to_dict(), "scfm_version": __version__, "vocab_sha256": vocab.sha256,
            "extra": dict(extra or {})}
    with atomic_output(directory) as tmp:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / WEIGHTS_FILE))
        vocab.save(tmp / VOCAB_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def load_checkpoint(path, *, version: str = "ce", vocab=None, map_location="cpu") -> LoadedModel:
    """Our checkpoint directory or an official ``.ckpt`` file (auto-detected) → model in eval mode."""
    path = Path(path)
    if not path.exists():
        raise ScfmError("checkpoint not found", path)
    if path.is_dir():
        loaded = _load_directory(path, vocab, map_location)
    else:
        loaded = _load_official(path, version, vocab, map_location)
    loaded.model.eval()
    return loaded


def _load_vocab(path):
    from scfm.data.vocab import Vocabulary

    return path if not isinstance(path, (str, os.PathLike)) else Vocabulary.load(path)


def _load_directory(directory: Path, vocab, map_location) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    for name in (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE):
        if not (directory / name).is_file():
            raise ScfmError(f"not a scfm checkpoint directory: {name} is missing", directory)
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
        config = ModelConfig.from_dict(meta["model"])
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ScfmError(f"unreadable {CONFIG_FILE}: {exc}", directory / CONFIG_FILE) from exc
    except ScfmError as exc:
        raise ScfmError(exc.message, directory / CONFIG_FILE) from exc
    own_vocab = _load_vocab(directory / VOCAB_FILE)
    recorded = meta.get("vocab_sha256")
    if recorded is not None and recorded != own_vocab.sha256:
        # gene i of the data would feed token i of another gene order: embeddings quietly wrong
        raise ScfmError(f"does not match {CONFIG_FILE} (vocab_sha256 {str(recorded)[:12]}…, the file has "
                        f"{own_vocab.sha256[:12]}…): the vocabulary was changed after the model was saved",
                        directory / VOCAB_FILE)
    if vocab is not None:
        given = _load_vocab(vocab)
        if given.sha256 != own_vocab.sha256:
            raise ScfmError(f"vocabulary mismatch: the checkpoint's vocab.tsv ({len(own_vocab)} genes, "
                            f"sha256 {own_vocab.sha256[:12]}) differs from the given one ({len(given)} genes, "
                            f"sha256 {given.sha256[:12]})", vocab if isinstance(vocab, (str, os.PathLike)) else directory)
    if len(own_vocab) != config.n_genes:
        raise ScfmError(f"vocab.tsv has {len(own_vocab)} genes but config.json says n_genes={config.n_genes}", directory)
    try:
        state = load_file(str(directory / WEIGHTS_FILE), device=str(map_location))
    except (SafetensorError, OSError) as exc:
        raise ScfmError(f"unreadable weights: {exc}", directory / WEIGHTS_FILE) from exc
    model = XTrimoGene(config)
    _load_strict(model, state, directory / WEIGHTS_FILE)
    return LoadedModel(model.to(map_location), config, own_vocab, f"scfm:{directory}", meta.get("extra") or {})


def _load_strict(model: XTrimoGene, state: Mapping[str, torch.Tensor], path) -> None:
    expected = model.state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"unexpected keys {_first(unexpected)}")
        if missing:
            parts.append(f"missing keys {_first(missing)}")
        raise ScfmError("weights do not match the model: " + "; ".join(parts), path)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ScfmError(f"weights hold a {type(value).__name__} for {key}, not a tensor", path)
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ScfmError(f"shape mismatch for {key}: file {tuple(value.shape)}, model {tuple(expected[key].shape)}",
                            path)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            # a model with a NaN weight embeds every cell as NaN
            raise ScfmError(f"weights hold NaN or infinite values ({key})", path)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def _first(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------ official format
def _official_to_ours(key: str) -> str | None:
    """Official state-dict key (without ``model.``) → our key; None if it has no counterpart."""
    fixed = {
        "token_emb.mlp.weight": "value_embed.to_bins.weight",
        "token_emb.mlp.bias": "value_embed.to_bins.bias",
        "token_emb.mlp2.weight": "value_embed.mix_bins.weight",
        "token_emb.mlp2.bias": "value_embed.mix_bins.bias",
        "token_emb.emb.weight": "value_embed.bins",
        "token_emb.emb_mask.weight": "value_embed.mask_vector",
        "token_emb.emb_pad.weight": "value_embed.pad_vector",
        "pos_emb.weight": "position_embed.weight",
        "encoder.norm.weight": "encoder_norm.weight",
        "encoder.norm.bias": "encoder_norm.bias",
        "decoder_embed.weight": "decoder_embed.weight",
        "decoder_embed.bias": "decoder_embed.bias",
        "decoder.norm.weight": "decoder_norm.weight",
        "decoder.norm.bias": "decoder_norm.bias",
        "norm.weight": "output_norm.weight",
        "norm.bias": "output_norm.bias",
        "to_final.weight": "head.weight",
        "to_final.bias": "head.bias",
    }
    if key in fixed:
        return fixed[key]
    enc = re.match(r"^encoder\.transformer_encoder\.(\d+)\.(.+)$", key)
    if enc:
        layer, rest = enc.groups()
        names = {"self_attn.in_proj_weight": "qkv.weight", "self_attn.in_proj_bias": "qkv.bias",
                 "self_attn.out_proj.weight": "attn_out.weight", "self_attn.out_proj.bias": "attn_out.bias",
                 "linear1.weight": "ff_in.weight", "linear1.bias": "ff_in.bias",
                 "linear2.weight": "ff_out.weight", "linear2.bias": "ff_out.bias",
                 "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias",
                 "norm2.weight": "norm2.weight", "norm2.bias": "norm2.bias"}
        return f"encoder.{layer}.{names[rest]}" if rest in names else None
    dec = re.match(r"^decoder\.performer\.net\.layers\.(\d+)\.([01])\.(.+)$", key)
    if dec:
        layer, block, rest = dec.groups()
        if block == "0":
            names = {"norm.weight": "attn_norm.weight", "norm.bias": "attn_norm.bias",
                     "fn.fast_attention.projection_matrix": "attn.projection"}
            for proj in ("to_q", "to_k", "to_v", "to_out"):
                for p in ("weight", "bias"):
                    names[f"fn.{proj}.{p}"] = f"attn.{proj}.{p}"
        else:
            names = {"norm.weight": "ff_norm.weight", "norm.bias": "ff_norm.bias",
                     "fn.fn.w1.weight": "ff_in.weight", "fn.fn.w1.bias": "ff_in.bias",
                     "fn.fn.w2.weight": "ff_out.weight", "fn.fn.w2.bias": "ff_out.bias"}
        return f"decoder.{layer}.{names[rest]}" if rest in names else None
    return None


def _official_config(entry: Mapping, state: Mapping[str, torch.Tensor], path: Path, key: str) -> ModelConfig:
    try:
        name = entry["config"]["model"]
        if name != "mae_autobin":
            raise ScfmError(f"[{key}] model type {name!r} is not supported (expected mae_autobin)", path)
        merged = {**entry["config"]["model_config"][name], **entry["config"].get("dataset_config", {}).get("rnaseq", {})}
        encoder, decoder = merged["encoder"], merged["decoder"]
        if encoder.get("module_type", "transformer") != "transformer" or decoder.get("module_type", "performer") != "performer":
            raise ScfmError(f"[{key}] expected a transformer encoder and a performer decoder, got "
                            f"{encoder.get('module_type')!r} / {decoder.get('module_type')!r}", path)
        head_dim = int(decoder.get("dim_head", 64))
        projection = state.get("decoder.performer.net.layers.0.0.fn.fast_attention.projection_matrix")
        ff_enc = state.get("encoder.transformer_encoder.0.linear1.weight")
        ff_dec = state.get("decoder.performer.net.layers.0.1.fn.fn.w1.weight")
        return ModelConfig(
            n_genes=int(merged["seq_len"]) - 2,
            n_bins=int(merged["bin_num"]),
            bin_alpha=float(merged["bin_alpha"]),
            mask_value=float(merged["mask_token_id"]),
            pad_value=float(merged["pad_token_id"]),
            encoder_dim=int(encoder["hidden_dim"]),
            encoder_layers=int(encoder["depth"]),
            encoder_heads=int(encoder["heads"]),
            encoder_ff_dim=int(ff_enc.shape[0]) if ff_enc is not None else 4 * int(encoder["hidden_dim"]),
            decoder_dim=int(decoder["hidden_dim"]),
            decoder_layers=int(decoder["depth"]),
            decoder_heads=int(decoder["heads"]),
            decoder_head_dim=head_dim,
            decoder_ff_dim=int(ff_dec.shape[0]) if ff_dec is not None else 4 * int(decoder["hidden_dim"]),
            performer_features=int(projection.shape[0]) if projection is not None else int(head_dim * math.log(head_dim)),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ScfmError(f"[{key}] unexpected official config layout ({type(exc).__name__}: {exc})", path) from exc
    except ScfmError as exc:
        raise ScfmError(f"[{key}] {exc.message}", path) from exc


def _load_official(path: Path, version: str, vocab, map_location) -> LoadedModel:
    if version not in VERSION_KEYS:
        raise ScfmError(f"unknown version {version!r} (choose from {', '.join(VERSION_KEYS)})", path)
    key = VERSION_KEYS[version]
    data = _torch_load_weights_only(path)
    if not isinstance(data, Mapping) or key not in data:
        found = ", ".join(map(str, data.keys())) if isinstance(data, Mapping) else type(data).__name__
        raise ScfmError(f"official checkpoint has no {key!r} model for version {version} (found: {found})", path)
    entry = data[key]
    if not isinstance(entry, Mapping) or "state_dict" not in entry or "config" not in entry:
        raise ScfmError(f"[{key}] expected 'config' and 'state_dict' entries", path)
    if not isinstance(entry["state_dict"], Mapping) or not isinstance(entry["config"], Mapping):
        raise ScfmError(f"[{key}] 'state_dict' and 'config' must be mappings, got "
                        f"{type(entry['state_dict']).__name__} and {type(entry['config']).__name__}", path)
    state = {}
    for name, value in entry["state_dict"].items():
        if not str(name).startswith("model."):
            raise ScfmError(f"[{key}] unexpected state-dict key {name!r} (official keys start with 'model.')", path)
        if not isinstance(value, torch.Tensor):
            raise ScfmError(f"[{key}] state_dict holds a {type(value).__name__} for {name}, not a tensor", path)
        state[str(name)[len("model."):]] = value
    config = _official_config(entry, state, path, key)

    mapped, unexpected = {}, []
    for name, value in state.items():
        ours = _official_to_ours(name)
        if ours is None:
            if not IGNORED_OFFICIAL_KEYS.match(name):
                unexpected.append(name)
            continue
        if ours in ("value_embed.mask_vector", "value_embed.pad_vector"):
            value = value.reshape(-1)  # Embedding(1, d) → (d,)
        mapped[ours] = value
    if unexpected:
        raise ScfmError(f"[{key}] unexpected keys in the official checkpoint: {_first(sorted(unexpected))}", path)

    if vocab is None:
        raise ScfmError("an official checkpoint carries no vocabulary: pass the gene list with --vocab "
                        "(OS_scRNA_gene_index.19264.tsv)", path)
    vocab_obj = _load_vocab(vocab)
    if len(vocab_obj) != config.n_genes:
        raise ScfmError(f"vocabulary mismatch: the checkpoint has {config.n_genes} genes, the vocabulary "
                        f"{len(vocab_obj)}", vocab if isinstance(vocab, (str, os.PathLike)) else path)
    model = XTrimoGene(config)
    _load_strict(model, mapped, path)
    return LoadedModel(model.to(map_location), config, vocab_obj, f"official:{key}:{path}", {"version": version})


def _torch_load_weights_only(path: Path):
    """``torch.load(weights_only=True)``, every failure one line naming the file.

    A file holding pickled objects (which could run code when loaded) is refused outright: torch's
    own message suggests retrying with ``weights_only=False``, which scfm never does.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise ScfmError(f"refused: holds pickled Python objects ({_unsafe_globals(path)}), not only tensors and "
                            "plain data; loading them could run code", path) from exc
        raise ScfmError(f"not a scfm checkpoint directory nor a readable official checkpoint ({_first_line(exc)})",
                        path) from exc
    except Exception as exc:  # a text file gives KeyError, a truncated one OSError, ...
        raise ScfmError(f"not a scfm checkpoint directory nor a readable official checkpoint ({_first_line(exc)})",
                        path) from exc


def _unsafe_globals(path: Path) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    return ", ".join(sorted(names)[:3]) or "not allowed by torch's weights-only loader"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------ identity
HASH_BLOCK = 1 << 20  # 1 MiB: checkpoints of 100M parameters are far too large to hash in one read


def file_sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(checkpoint, version: str = "ce") -> str:
    """SHA-256 of the weights that are loaded: ``model.safetensors`` of our checkpoint directory, or an
    official ``.ckpt`` plus the chosen model (``"<sha>:ce"``), since one file holds several models.

    Paths differ between machines and pipeline tasks; this is what says two embeddings share a model.
    """
    path = Path(checkpoint)
    if path.is_dir():
        return file_sha256(path / WEIGHTS_FILE)
    return f"{file_sha256(path)}:{version}"


# ----------------------------------------------------------- random checkpoint in the official layout
def official_state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Key → shape of the released model's state dict (without the ``model.`` prefix)."""
    d, dd, bins = config.encoder_dim, config.decoder_dim, config.n_bins
    inner = config.decoder_heads * config.decoder_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "token_emb.mlp.weight": (bins, 1), "token_emb.mlp.bias": (bins,),
        "token_emb.mlp2.weight": (bins, bins), "token_emb.mlp2.bias": (bins,),
        "token_emb.emb.weight": (bins, d), "token_emb.emb_mask.weight": (1, d), "token_emb.emb_pad.weight": (1, d),
        "pos_emb.weight": (config.n_positions + 1, d),
    }
    for i in range(config.encoder_layers):
        p = f"encoder.transformer_encoder.{i}."
        shapes.update({
            p + "self_attn.in_proj_weight": (3 * d, d), p + "self_attn.in_proj_bias": (3 * d,),
            p + "self_attn.out_proj.weight": (d, d), p + "self_attn.out_proj.bias": (d,),
            p + "linear1.weight": (config.encoder_ff_dim, d), p + "linear1.bias": (config.encoder_ff_dim,),
            p + "linear2.weight": (d, config.encoder_ff_dim), p + "linear2.bias": (d,),
            p + "norm1.weight": (d,), p + "norm1.bias": (d,), p + "norm2.weight": (d,), p + "norm2.bias": (d,),
        })
    shapes.update({"encoder.norm.weight": (d,), "encoder.norm.bias": (d,),
                   "decoder_embed.weight": (dd, d), "decoder_embed.bias": (dd,)})
    for i in range(config.decoder_layers):
        p = f"decoder.performer.net.layers.{i}."
        shapes.update({
            p + "0.norm.weight": (dd,), p + "0.norm.bias": (dd,),
            p + "0.fn.fast_attention.projection_matrix": (config.performer_features, config.decoder_head_dim),
            p + "0.fn.to_q.weight": (inner, dd), p + "0.fn.to_q.bias": (inner,),
            p + "0.fn.to_k.weight": (inner, dd), p + "0.fn.to_k.bias": (inner,),
            p + "0.fn.to_v.weight": (inner, dd), p + "0.fn.to_v.bias": (inner,),
            p + "0.fn.to_out.weight": (dd, inner), p + "0.fn.to_out.bias": (dd,),
            p + "1.norm.weight": (dd,), p + "1.norm.bias": (dd,),
            p + "1.fn.fn.w1.weight": (config.decoder_ff_dim, dd), p + "1.fn.fn.w1.bias": (config.decoder_ff_dim,),
            p + "1.fn.fn.w2.weight": (dd, config.decoder_ff_dim), p + "1.fn.fn.w2.bias": (dd,),
        })
    shapes.update({"decoder.performer.calls_since_last_redraw": (), "decoder.norm.weight": (dd,),
                   "decoder.norm.bias": (dd,), "norm.weight": (dd,), "norm.bias": (dd,),
                   "to_final.weight": (1, dd), "to_final.bias": (1,)})
    return shapes


def _random_official_state(config: ModelConfig, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Values like a freshly initialised official model: Linear U(±1/sqrt(fan_in)), Embedding N(0, 1)."""
    state = {}
    for key, shape in official_state_shapes(config).items():
        if key.endswith("calls_since_last_redraw"):
            value = torch.tensor(0)
        elif key.endswith("projection_matrix"):
            value = orthogonal_gaussian_projection(shape[0], shape[1], generator)
        elif key.startswith(("token_emb.emb", "pos_emb")):
            value = torch.randn(shape, generator=generator)
        elif key.split(".")[-2] in ("norm", "norm1", "norm2"):
            base = 1.0 if key.endswith("weight") else 0.0
            value = base + 0.1 * torch.randn(shape, generator=generator)
        else:
            fan_in = shape[1] if len(shape) == 2 else _fan_in_of_bias(key, config)
            bound = 1.0 / math.sqrt(fan_in)
            value = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        state["model." + key] = value
    return state


def _fan_in_of_bias(key: str, config: ModelConfig) -> int:
    if "mlp2" in key:
        return config.n_bins
    if "token_emb.mlp" in key:
        return 1
    if "linear2" in key:
        return config.encoder_ff_dim
    if "w2" in key:
        return config.decoder_ff_dim
    if key.startswith(("decoder.performer", "to_final")):
        return config.decoder_dim
    return config.encoder_dim


def official_config_dict(config: ModelConfig) -> dict:
    """The ``config`` entry of an official checkpoint for this shape."""
    model_config = {
        "model": "mae_autobin",
        "encoder": {"hidden_dim": config.encoder_dim, "depth": config.encoder_layers,
                    "heads": config.encoder_heads, "dim_head": config.encoder_dim // config.encoder_heads,
                    "module_type": "transformer"},
        "decoder": {"hidden_dim": config.decoder_dim, "depth": config.decoder_layers,
                    "heads": config.decoder_heads, "dim_head": config.decoder_head_dim,
                    "module_type": "performer"},
        "n_class": int(config.pad_value) + 1,
        "seq_len": config.n_positions,
        "bin_alpha": config.bin_alpha,
        "bin_num": config.n_bins,
        "pad_token_id": int(config.pad_value),
        "mask_token_id": int(config.mask_value),
    }
    return {"model": "mae_autobin", "model_config": {"mae_autobin": model_config},
            "dataset_config": {"rnaseq": {"bin_num": config.n_bins, "bin_type": "auto_bin"}}}


def write_official_style_checkpoint(path, config: ModelConfig, seed: int = 0, *,
                                    versions=("gene", "cell", "rde")) -> Path:
    """A random-weight checkpoint in the released file's layout (for tests and cross-checks)."""
    data = {}
    for offset, key in enumerate(versions):
        generator = torch.Generator().manual_seed(seed * 1000 + offset)
        data[key] = {"config": official_config_dict(config), "state_dict": _random_official_state(config, generator)}
    path = Path(path)
    with atomic_output(path) as tmp:
        torch.save(data, tmp)
    return path
