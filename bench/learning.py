"""What does a short pretraining run learn? Synthetic cells of known structure, several objectives and rates.

    .venv/bin/python bench/learning.py --steps 1500 --lr 5e-4 [--genes 120] [--zero-mask-ratio 0.03]
                                       [--mask-ratio 0.3] [--json out.json]

The cells, the training step and the measures are those of ``tests/train/test_learning.py`` (imported
from there): four expression programs, multinomial counts at depths 630-32,000, the pretraining code
in-process without DeepSpeed. Reports the held-out masked MSE against the per-gene mean, the error of
cells thinned to a fifth and restored at their original depth against a copy of the thinned input,
and the depth response: the mean prediction at the genes the thinned input lost, and the predicted
library (sum of expm1 of the predictions), at T = S, S + 0.35, S + 0.7 and S + 1.4. With
``--probe`` it also reports how much the encoder's output at the T token changes between T = 3.0
and T = 4.5, per layer (relative to its norm).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "train"))
from test_learning import held_out_loss, normalised, programs, sample_cells, thinned_predictions, train  # noqa: E402

from scfm.model import inputs as I  # noqa: E402
from scfm.train.objective import ObjectiveConfig  # noqa: E402


def t_token_change(model) -> list[float]:
    """Relative change of the T token's representation after each encoder layer, T = 3.0 vs 4.5."""
    n_genes = model.config.n_genes
    ids = [np.arange(0, n_genes, 2)]
    layers = []
    for depth in (3.0, 4.5):
        batch = I.build_pretrain_batch(ids, [np.full(ids[0].size, 2.0, np.float32)], [np.zeros(ids[0].size, bool)],
                                       [depth], [3.0], model.config)
        enc = batch.encoder
        with torch.no_grad():
            x = model.value_embed(enc.values, padded=enc.padding_mask) + model.position_embed(enc.gene_ids)
            states = [x]
            for layer in model.encoder:
                x = layer(x, ~enc.padding_mask[:, None, None, :])
                states.append(x)
        layers.append([s[0, -2] for s in states])
    return [round(float((a - b).norm() / a.norm()), 4) for a, b in zip(*layers)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--genes", type=int, default=120)
    parser.add_argument("--mask-ratio", type=float, default=0.3)
    parser.add_argument("--zero-mask-ratio", type=float, default=0.03)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    proportions = programs(np.random.default_rng(0), n_genes=args.genes)
    train_cells, test_cells = sample_cells(proportions, 2000, seed=1), sample_cells(proportions, 200, seed=2)
    objective = ObjectiveConfig(mask_ratio=args.mask_ratio, zero_mask_ratio=args.zero_mask_ratio)
    started = time.perf_counter()
    model = train(train_cells, objective, steps=args.steps, lr=args.lr, n_genes=args.genes)
    result = {"settings": vars(args) | {"json": None}, "train_s": round(time.perf_counter() - started, 1),
              "held_out_loss": held_out_loss(model, test_cells, ObjectiveConfig()),
              "per_gene_mean_loss": held_out_loss(model, test_cells, ObjectiveConfig(),
                                                  normalised(train_cells).mean(axis=0))}
    added = (0.0, 0.35, 0.7, 1.4)
    thinned, original, predictions = thinned_predictions(model, test_cells, added)
    missed = thinned == 0
    result["restored_mse_at_original_depth"] = float(np.mean((predictions[0.7] - original) ** 2))
    result["copy_mse"] = float(np.mean((thinned - original) ** 2))
    result["original_at_missed"] = float(original[missed].mean())
    result["depth_response"] = {f"S+{a}": {"at_missed": round(float(predictions[a][missed].mean()), 4),
                                           "library": round(float(np.expm1(predictions[a]).sum(axis=1).mean()), 1)}
                                for a in added}
    if args.probe:
        result["t_token_relative_change_per_layer"] = t_token_change(model)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
