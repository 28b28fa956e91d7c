"""The xTrimoGene model: config, modules, inputs and checkpoints (see each module's docstring)."""

from scfm.model.config import ModelConfig
from scfm.model.xtrimogene import XTrimoGene

__all__ = ["ModelConfig", "XTrimoGene"]
