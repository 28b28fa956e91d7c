"""Figures written next to the drug models (PNG files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scfm.report.plots import _pyplot, figure_png


def training_curve_png(history: list[dict]) -> bytes:
    plt = _pyplot()
    frame = pd.DataFrame(history)
    fig, left = plt.subplots(figsize=(6, 3.6))
    left.plot(frame["epoch"], frame["train_mse"], label="train MSE")
    left.plot(frame["epoch"], frame["val_mse"], label="validation MSE")
    left.set_xlabel("epoch")
    left.set_ylabel("MSE (ln IC50)")
    right = left.twinx()
    right.plot(frame["epoch"], frame["val_pearson"], color="tab:green", label="validation Pearson")
    right.set_ylabel("Pearson")
    fig.legend(loc="upper right", fontsize=8, frameon=False)
    fig.tight_layout()
    return figure_png(fig)


def observed_vs_predicted_png(part: pd.DataFrame, title: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    take = part.sample(min(len(part), 20_000), random_state=0)
    ax.scatter(take["ln_ic50"], take["predicted_ln_ic50"], s=2, alpha=0.3, linewidths=0)
    low, high = np.nanmin(take[["ln_ic50", "predicted_ln_ic50"]].to_numpy()), np.nanmax(
        take[["ln_ic50", "predicted_ln_ic50"]].to_numpy())
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8)
    ax.set_xlabel("observed ln IC50")
    ax.set_ylabel("predicted ln IC50")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


def per_drug_pearson_png(part: pd.DataFrame, min_pairs: int) -> bytes:
    plt = _pyplot()
    values = [np.corrcoef(g["ln_ic50"], g["predicted_ln_ic50"])[0, 1] for _, g in part.groupby("drug")
              if len(g) >= min_pairs and g["ln_ic50"].std() > 0 and g["predicted_ln_ic50"].std() > 0]
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    ax.hist(values, bins=30, range=(-1, 1))
    ax.set_xlabel("Pearson within a drug")
    ax.set_ylabel("drugs")
    fig.tight_layout()
    return figure_png(fig)


def write_regression_plots(directory: Path, history: list[dict], predictions: pd.DataFrame, min_pairs: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "training_curve.png").write_bytes(training_curve_png(history))
    evaluated = predictions[predictions["split"] == "test"]
    name = "test"
    if evaluated.empty:
        evaluated, name = predictions[predictions["split"] == "val"], "validation"
    (directory / "observed_vs_predicted.png").write_bytes(observed_vs_predicted_png(evaluated, f"{name} pairs"))
    (directory / "per_drug_pearson.png").write_bytes(per_drug_pearson_png(evaluated, min_pairs))


def sensitivity_histogram_png(scores: pd.DataFrame) -> bytes:
    """One histogram of per-cell sensitivity per drug (columns of ``scores``)."""
    plt = _pyplot()
    n = scores.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, column in zip(axes[0], scores.columns):
        ax.hist(scores[column].to_numpy(dtype=float), bins=25, range=(0, 1))
        ax.set_title(column, fontsize=8)
        ax.set_xlabel("P(sensitive)")
    fig.tight_layout()
    return figure_png(fig)


def transfer_curves_png(histories: dict[str, list[dict]]) -> bytes:
    """Per drug: the sensitivity loss on bulk lines and the domain loss (ln 2 when the domains are mixed)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for drug, history in histories.items():
        frame = pd.DataFrame(history)
        axes[0].plot(frame["epoch"], frame["label_loss"], label=drug)
        axes[1].plot(frame["epoch"], frame["domain_loss"], label=drug)
    axes[0].set_title("sensitivity loss (bulk lines)", fontsize=9)
    axes[1].set_title("domain loss (ln 2 = domains mixed)", fontsize=9)
    axes[1].axhline(np.log(2), color="grey", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("epoch")
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return figure_png(fig)
