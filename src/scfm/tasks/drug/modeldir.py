"""The drug models' directory format: ``config.json`` (with a ``kind``) and ``model.safetensors``; nothing pickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from scfm.errors import ScfmError

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def write_model_dir(directory: Path, kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    from scfm import __version__

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE))
    text = json.dumps({"kind": kind, "scfm_version": __version__, **config}, indent=2, default=_json_default,
                      allow_nan=False)
    (directory / CONFIG_FILE).write_text(text + "\n")


def read_model_dir(directory, kind: str, what: str, command: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors) of a model directory of ``kind``; anything else is refused in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        tensors = load_file(str(directory / WEIGHTS_FILE))
    except (OSError, json.JSONDecodeError, SafetensorError) as exc:
        raise ScfmError(f"not a {what} directory ({type(exc).__name__}: {exc})", directory) from exc
    if config.get("kind") != kind:
        raise ScfmError(f"not a {what} (kind {config.get('kind')!r}; `{command}` writes one)", directory)
    return config, tensors


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
