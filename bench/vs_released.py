"""scfm against the released scFoundation model code: agreement and interleaved speed, on a CPU.

    git clone https://github.com/biomap-research/scFoundation /somewhere/scFoundation   # not part of scfm
    pip install --target /somewhere/deps --no-deps einops "local-attention==1.4.4"   # what its modules import
    PYTHONPATH=/somewhere/deps .venv/bin/python bench/vs_released.py \
        --released /somewhere/scFoundation/model --json /tmp/vs_released.json

``--released`` is the ``model/`` folder of a checkout of the released code (it holds ``load.py`` and
``pretrainmodels/``). Nothing from it is copied into scfm: this script imports it at run time and makes
its ``.cuda()`` calls no-ops, so that it runs on a CPU. Both sides get the same random weights in the
released checkpoint layout (``scfm.model.checkpoint.write_official_style_checkpoint``) and the same real
PBMC counts placed in a 19,264-gene vocabulary (as in ``bench/embed.py``).

Sections
- agreement: cell embeddings for versions ce / rde, pools all / max and target depths t4 / f1 / a5 (ours in
             padded batches of 8, theirs one cell at a time), and the decoder's gene expression (gene
             version, t4): min cosine and max abs difference per setting.
- speed:     cell embeddings (ce, pool all, t4), rounds interleaved so that load from elsewhere hits every
             path alike; best round per path. The released path is timed as its embedding script runs it:
             one cell at a time, from that cell's counts to its embedding (its dense cells x genes table
             is not built here, which only flatters it). Ours: ``embed_cells`` in fp32 and bf16 at the
             CPU default batch size, and one cell at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import N_GENES, _machine, cosine_rows, pbmc_in_vocabulary  # noqa: E402

from scfm.data.vocab import Vocabulary  # noqa: E402
from scfm.model import ModelConfig  # noqa: E402
from scfm.model.checkpoint import load_checkpoint, write_official_style_checkpoint  # noqa: E402
from scfm.tasks.embed import default_batch_size, embed_cells, predict_expression  # noqa: E402

CELL_KEYS = {"ce": "cell", "rde": "rde"}


def import_released(model_dir: Path):
    """The released ``load`` module, with ``.cuda()`` made a no-op so that it runs on a CPU."""
    if not (model_dir / "load.py").is_file() or not (model_dir / "pretrainmodels").is_dir():
        sys.exit(f"{model_dir}: not the released code's model/ folder (load.py and pretrainmodels/ expected)")
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    sys.path.insert(0, str(model_dir))
    import load  # noqa: PLC0415  (the released module)

    return load


class Released:
    """One cell at a time through the released modules, inputs prepared the way its script prepares them."""

    def __init__(self, load, checkpoint: Path, key: str):
        self.load = load
        self.model, self.config = load.load_model_frommmf(str(checkpoint), key)
        self.model.eval()

    def _cell_row(self, counts, row: int, target_depth: str) -> torch.Tensor:
        x = counts[row].toarray().ravel().astype(np.float64)
        total = x.sum()
        kind, number = target_depth[0], float(target_depth[1:])
        target = {"t": number, "f": np.log10(total * number), "a": np.log10(total) + number}[kind]
        values = np.log1p(x / total * 1e4).tolist() + [target, np.log10(total)]
        return torch.tensor(values).unsqueeze(0)

    @torch.no_grad()
    def cell_embedding(self, counts, row: int, target_depth: str = "t4", pool: str = "all") -> np.ndarray:
        x = self._cell_row(counts, row, target_depth)
        positive = x > 0
        pad = self.config["pad_token_id"]
        tokens, padding = self.load.gatherData(x, positive, pad)
        positions, _ = self.load.gatherData(torch.arange(x.shape[1]).unsqueeze(0), positive, pad)
        h = self.model.token_emb(tokens.unsqueeze(2).float(), output_weight=0) + self.model.pos_emb(positions)
        h = self.model.encoder(h, padding)
        if pool == "all":  # S, T, max and mean over genes
            pooled = torch.cat([h[:, -1], h[:, -2], h[:, :-2].max(1)[0], h[:, :-2].mean(1)], 1)
        else:
            pooled = h.max(1)[0]
        return pooled[0].numpy()

    @torch.no_grad()
    def expression(self, counts, row: int, target_depth: str = "t4") -> np.ndarray:
        x = self._cell_row(counts, row, target_depth).float()
        (enc, enc_pos, enc_pad, enc_labels, dec, dec_pad, _, _, dec_pos) = self.load.getEncoerDecoderData(
            x, x, self.config)
        out = self.model.forward(x=enc, padding_label=enc_pad, encoder_position_gene_ids=enc_pos,
                                 encoder_labels=enc_labels, decoder_data=dec, mask_gene_name=False,
                                 mask_labels=None, decoder_position_gene_ids=dec_pos,
                                 decoder_data_padding_labels=dec_pad)
        return out[0, :N_GENES].numpy()


def _compare(ref: np.ndarray, ours: np.ndarray, **settings) -> dict:
    return {**settings, "cosine_min": float(cosine_rows(ref, ours).min()),
            "max_abs_diff": float(np.abs(ref - ours).max()), "max_abs_value": float(np.abs(ref).max())}


def agreement(load, checkpoint: Path, vocab, counts, n_decoder_cells: int) -> list[dict]:
    rows = []
    for version, key in CELL_KEYS.items():
        theirs = Released(load, checkpoint, key)
        ours = load_checkpoint(checkpoint, version=version, vocab=vocab)
        for depth in ("t4", "f1", "a5"):
            for pool in ("all", "max"):
                ref = np.stack([theirs.cell_embedding(counts, r, depth, pool) for r in range(counts.shape[0])])
                mine = embed_cells(ours, counts, pool=pool, target_depth=depth, batch_size=8, device="cpu")
                rows.append(_compare(ref, mine, version=version, pool=pool, target_depth=depth,
                                     cells=counts.shape[0]))
                print(json.dumps(rows[-1]), flush=True)
    theirs = Released(load, checkpoint, "gene")
    ours = load_checkpoint(checkpoint, version="gene", vocab=vocab)
    few = counts[:n_decoder_cells]
    ref = np.stack([theirs.expression(few, r) for r in range(few.shape[0])])
    mine = predict_expression(ours, few, target_depth="t4", batch_size=2, device="cpu")
    rows.append(_compare(ref, mine, version="gene", output="gene-expression", target_depth="t4", cells=len(ref)))
    print(json.dumps(rows[-1]), flush=True)
    return rows


def speed(load, checkpoint: Path, vocab, counts, rounds: int) -> list[dict]:
    theirs = Released(load, checkpoint, "cell")
    ours = load_checkpoint(checkpoint, version="ce", vocab=vocab)
    n = counts.shape[0]
    batch = default_batch_size("cell", "cpu")
    paths = {
        "released, one cell at a time, fp32": lambda cells: np.stack(
            [theirs.cell_embedding(cells, r) for r in range(cells.shape[0])]),
        f"scfm, bucketed batches of {batch}, fp32": lambda cells: embed_cells(ours, cells, precision="fp32",
                                                                            batch_size=batch, device="cpu"),
        f"scfm, bucketed batches of {batch}, bf16": lambda cells: embed_cells(ours, cells, precision="bf16",
                                                                            batch_size=batch, device="cpu"),
        "scfm, one cell at a time, fp32": lambda cells: embed_cells(ours, cells, precision="fp32", batch_size=1,
                                                                    chunk_size=1, device="cpu"),
    }
    for run in paths.values():  # warm-up (allocator, kernels) on a few cells
        run(counts[:batch])
    seconds = {name: [] for name in paths}
    outputs = {}
    for _ in range(rounds):
        for name, run in paths.items():
            start = time.perf_counter()
            outputs[name] = run(counts)
            seconds[name].append(time.perf_counter() - start)
    released_name = next(iter(paths))
    released_rate = n / min(seconds[released_name])
    rows = []
    for name in paths:
        rate = n / min(seconds[name])
        rows.append({"path": name, "cells": n, "cells_per_s": rate, "vs_released": rate / released_rate,
                     "seconds_per_round": seconds[name],
                     "min_cosine_to_released": float(cosine_rows(outputs[released_name], outputs[name]).min())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--released", type=Path, required=True, help="the released code's model/ folder")
    parser.add_argument("--sections", default="agreement,speed")
    parser.add_argument("--preset", default="base-100m")
    parser.add_argument("--agreement-cells", type=int, default=4)
    parser.add_argument("--decoder-cells", type=int, default=1)
    parser.add_argument("--speed-cells", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    load = import_released(args.released.resolve())
    sections = set(args.sections.split(","))
    results: dict = {"machine": _machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "preset": args.preset}
    vocab = Vocabulary([f"G{i}" for i in range(N_GENES)])
    with tempfile.TemporaryDirectory(prefix="scfm-vs-released-") as scratch:
        checkpoint = write_official_style_checkpoint(Path(scratch) / "official.ckpt",
                                                      ModelConfig.preset(args.preset, n_genes=N_GENES), seed=7)
        if "agreement" in sections:
            counts = pbmc_in_vocabulary(args.agreement_cells, seed=1)
            results["agreement"] = agreement(load, checkpoint, vocab, counts, args.decoder_cells)
        if "speed" in sections:
            counts = pbmc_in_vocabulary(args.speed_cells, seed=1)
            results["speed"] = speed(load, checkpoint, vocab, counts, args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
