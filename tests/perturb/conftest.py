"""Fixtures of the perturbation tests: a synthetic screen on disk and a tiny scfm checkpoint over its genes."""

from __future__ import annotations

import pytest

from perturb_data import GENES, synthetic_screen


@pytest.fixture(scope="session")
def screen_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("screen") / "screen.h5ad"
    synthetic_screen().write_h5ad(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny, randomly initialised scfm checkpoint whose vocabulary is the synthetic genes."""
    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    vocab = Vocabulary(GENES)
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(path, XTrimoGene(config, seed=0), config, vocab)
    return path
