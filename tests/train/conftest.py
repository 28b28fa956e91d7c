"""Fixtures of the training tests: the 700 real PBMCs as shards, as an aligned h5ad, and a tiny checkpoint."""

from __future__ import annotations


import pytest

LABEL_KEY = "bulk_labels"


@pytest.fixture(scope="session")
def train_data(pbmc_counts, tmp_path_factory):
    """dict of paths: vocab (TSV), shards (dir, row groups of 50 cells), aligned (h5ad), checkpoint (tiny, random)."""
    from scfm.data.shards import ShardWriter
    from scfm.data.vocab import Vocabulary
    from scfm.model.checkpoint import save_checkpoint
    from scfm.model.config import ModelConfig
    from scfm.model.xtrimogene import XTrimoGene

    root = tmp_path_factory.mktemp("train_data")
    adata = pbmc_counts.copy()
    vocab = Vocabulary(list(adata.var_names))
    vocab.save(root / "vocab.tsv")
    with ShardWriter(root / "shards", vocab, [LABEL_KEY], cells_per_shard=350, row_group_size=50) as writer:
        writer.write(list(adata.obs_names), adata.X, adata.obs)
    adata.uns["scfm"] = {"vocab_sha256": vocab.sha256, "counts_source": "X"}
    adata.write_h5ad(root / "pbmc.aligned.h5ad")
    config = ModelConfig.preset("tiny", n_genes=len(vocab))
    save_checkpoint(root / "tiny_random", XTrimoGene(config, seed=0), config, vocab)
    return {"root": root, "vocab": root / "vocab.tsv", "shards": root / "shards",
            "aligned": root / "pbmc.aligned.h5ad", "checkpoint": root / "tiny_random", "vocab_obj": vocab}
